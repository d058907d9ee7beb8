"""DEC (Xie et al., ICML 2016) and IDEC (Guo et al., IJCAI 2017) losses, as pure functions.

q_ij = (1 + ||z_i - mu_j||^2 / alpha)^(-(alpha + 1) / 2), normalised over j (Student's t kernel);
p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j'), f_j = sum_i q_ij over the WHOLE dataset (DEC's
"auxiliary target", computed from all N rows and then held fixed); L_c = KL(P || Q);
IDEC: L = L_r + gamma * L_c, the weight gamma on the clustering term.
"""
from __future__ import annotations

import torch


def soft_assignment(embeddings: torch.Tensor, centroids: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """Student's t soft assignment. embeddings (B, D), centroids (K, D) -> q (B, K), rows sum to 1."""
    # the direct form (not cdist's matmul expansion, which loses precision near a centroid); cheap at small K
    squared = (embeddings.unsqueeze(1) - centroids.unsqueeze(0)).square().sum(-1)
    kernel = (1.0 + squared / alpha).pow(-(alpha + 1.0) / 2.0)
    return kernel / kernel.sum(dim=1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """DEC's sharpened target from the whole dataset's soft assignments: q (N, K) -> p (N, K).
    p_ij = q_ij^2 / f_j, renormalised per row; f_j = sum_i q_ij is the soft cluster frequency, so
    large clusters are penalised. Needs all N rows (a per-batch f_j is ODC's drift)."""
    weight = q.square() / q.sum(dim=0, keepdim=True)
    return weight / weight.sum(dim=1, keepdim=True)


def kl_clustering_loss(p: torch.Tensor, q: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """KL(P || Q) = sum_j p_ij log(p_ij / q_ij), averaged over the B rows. p, q (B, K) -> scalar.
    p is a fixed target (no gradient flows into it); rows with p_ij = 0 contribute 0."""
    p = p.detach()
    return (p * (torch.log(p.clamp_min(eps)) - torch.log(q.clamp_min(eps)))).sum(dim=1).mean()


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element: reconstruction, target (B, ...) -> scalar."""
    return (reconstruction - target).square().mean()


def idec_loss(*, reconstruction: torch.Tensor, inputs: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
              gamma: float) -> dict[str, torch.Tensor]:
    """IDEC's objective L = L_r + gamma * L_c (gamma weighs the CLUSTERING term; 0.1 in the paper).
    reconstruction, inputs (B, ...); p, q (B, K). Returns {"loss", "reconstruction", "clustering"}
    with the unweighted terms, so that loss == reconstruction + gamma * clustering."""
    l_r = reconstruction_loss(reconstruction, inputs)
    l_c = kl_clustering_loss(p, q)
    return {"loss": l_r + gamma * l_c, "reconstruction": l_r, "clustering": l_c}
