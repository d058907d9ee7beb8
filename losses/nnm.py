"""NNM's losses (Dang et al., CVPR 2021): SCAN's pair consistency at two scales, each with a
cluster-level contrast.

Rows of P are the anchors' softmax assignments, the rows of Q their partners' at the same position
(a listed neighbour, or the nearest other anchor of the batch). The local terms compare P with Q;
the global ones compare [P; Q] with the assignments of each anchor's nearest sample over the whole
dataset (a bank refreshed between epochs). Each scale adds a contrast between the K columns: column k
of P and column k of Q describe the same cluster over the batch and should match each other more than
any other column.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.scan import mean_assignment_entropy, pair_consistency


def cluster_column_contrast(p: torch.Tensor, q: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """-(1/K) sum_k log softmax_j(<p_k, q_j> / temperature)_k over the L2-normalised columns p_k, q_j of
    p, q (R, K): each cluster's column in p should be most similar to the same cluster's column in q."""
    if p.shape != q.shape or p.dim() != 2:
        raise ValueError(f"p and q must both be (R, K), got {tuple(p.shape)} and {tuple(q.shape)}")
    similarity = F.normalize(p, dim=0).t() @ F.normalize(q, dim=0) / temperature       # (K, K)
    return F.cross_entropy(similarity, torch.arange(p.shape[1], device=p.device))


def nnm_loss(p: torch.Tensor, q: torch.Tensor, bank: torch.Tensor | None, *,
             entropy_weight: float) -> dict[str, torch.Tensor]:
    """NNM's loss for one head: {"loss", "local", "local_cluster", "global", "global_cluster", "entropy"}.

    p, q (2B, K): [p(a); p(a')] (two views of the anchors) and [p(n); p(a_j)] (a listed neighbour of each
    anchor, and the nearest other anchor of the batch). bank (B, K): the assignment of each anchor's
    nearest sample in the whole dataset, or None before the bank exists (the global terms are then 0).
    loss = local + local_cluster + global + global_cluster - entropy_weight * H(mean row of p), with
    global terms between [p; q] (4B, K) and the bank rows repeated 4 times.
    """
    if p.shape != q.shape or p.dim() != 2 or p.shape[0] % 2:
        raise ValueError(f"p and q must both be (2B, K), got {tuple(p.shape)} and {tuple(q.shape)}")
    terms = {"local": pair_consistency(p, q), "local_cluster": cluster_column_contrast(p, q)}
    if bank is None:
        terms["global"] = terms["global_cluster"] = p.new_zeros(())
    else:
        if bank.shape != (p.shape[0] // 2, p.shape[1]):
            raise ValueError(f"bank must be (B, K) = {(p.shape[0] // 2, p.shape[1])}, got {tuple(bank.shape)}")
        both, targets = torch.cat([p, q]), bank.repeat(4, 1)
        terms["global"] = pair_consistency(both, targets)
        terms["global_cluster"] = cluster_column_contrast(both, targets)
    terms["entropy"] = mean_assignment_entropy(p)
    terms["loss"] = (terms["local"] + terms["local_cluster"] + terms["global"] + terms["global_cluster"]
                     - entropy_weight * terms["entropy"])
    return terms
