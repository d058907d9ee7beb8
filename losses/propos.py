"""ProPos's two terms (Huang et al., TPAMI 2022), and BYOL's alignment which the first one extends."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_alignment_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 2 - 2 cos(prediction_i, target_i).

    prediction, target: (B, D); the target carries no gradient (detach it before calling if needed).
    ProPos's positive sampling alignment is this loss with the prediction made from a latent
    neighbour q + sigma * eps of the online projection q.
    """
    cos = F.cosine_similarity(prediction, target, dim=1)
    return (2.0 - 2.0 * cos).mean()


def prototype_scattering_loss(online: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, *,
                              num_clusters: int, temperature: float) -> torch.Tensor:
    """Prototype scattering loss over the clusters present in a (global) batch.

    online: (n, D) L2-normalised online projections q (with gradient); target: (n, D) normalised
    target projections k; labels: (n,) pseudo-labels in [0, num_clusters).
    For each present cluster c, mu_c = normalise(mean of its q) and nu_c = normalise(mean of its k);
    loss_c = -mu_c.nu_c / t + log(exp(mu_c.nu_c / t) + sum_{j != c, present} exp(mu_c.mu_j / t)),
    i.e. a cross-entropy whose positive is the same cluster in the other view and whose negatives are
    the other clusters' prototypes in the same view. Returns the mean over present clusters (0 with
    no gradient-breaking special case when only one cluster is present: its only logit is the positive).
    """
    if online.shape != target.shape or online.dim() != 2:
        raise ValueError(f"online and target must both be (n, D), got {tuple(online.shape)} and {tuple(target.shape)}")
    if labels.shape != (online.shape[0],):
        raise ValueError(f"labels must be (n,) = ({online.shape[0]},), got {tuple(labels.shape)}")
    one_hot = F.one_hot(labels.long(), num_clusters).to(online.dtype)       # (n, K)
    present = one_hot.sum(0) > 0                                            # (K,)
    membership = one_hot[:, present]                                        # (n, P)
    mu = F.normalize(membership.t() @ online, dim=1)                        # (P, D)
    nu = F.normalize(membership.t() @ target.to(online.dtype), dim=1)       # (P, D)
    logits = mu @ mu.t() / temperature                                      # negatives: other prototypes, same view
    positives = (mu * nu).sum(1) / temperature                              # positive: same cluster, other view
    diagonal = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    logits = torch.where(diagonal, positives.unsqueeze(1).expand_as(logits), logits)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets)
