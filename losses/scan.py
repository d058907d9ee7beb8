"""SCAN's clustering loss (Van Gansbeke et al., ECCV 2020).

An image and one of its mined neighbours should land in the same cluster with confidence: the
consistency term is -mean_i log <p(x_i), p(n_i)>, the inner product of the two softmax rows. Alone
it is minimised by putting every image in one cluster, so the entropy of the batch's mean
assignment, H((1/B) sum_i p(x_i)), is subtracted with a weight (5.0 in every SCAN config).
"""
from __future__ import annotations

import torch

# SCAN's reference clamps the same way: log of an inner product or a share below this is taken at it,
# so a collapsed head gives a large finite loss, not inf or NaN gradients.
_EPS = 1e-8


def mean_assignment_entropy(p: torch.Tensor) -> torch.Tensor:
    """H of the mean row of p (B, K) softmax rows: -sum_k m_k log m_k, m = mean_i p_i; in [0, log K]."""
    if p.dim() != 2:
        raise ValueError(f"p must be (B, K) soft assignments, got {tuple(p.shape)}")
    mean = p.mean(dim=0).clamp_min(_EPS)
    return -(mean * mean.log()).sum()


def scan_loss(p_anchor: torch.Tensor, p_neighbour: torch.Tensor, *,
              entropy_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SCAN's loss for one head: (total, consistency, entropy).

    p_anchor, p_neighbour: (B, K) softmax rows of the anchors and of one neighbour of each.
    consistency = -(1/B) sum_i log <p_anchor_i, p_neighbour_i>; entropy = H(mean_i p_anchor_i);
    total = consistency - entropy_weight * entropy. Gather both across ranks (with gradients) first
    so that the entropy term is over the global batch.
    """
    if p_anchor.shape != p_neighbour.shape or p_anchor.dim() != 2:
        raise ValueError(f"p_anchor and p_neighbour must both be (B, K), got {tuple(p_anchor.shape)} and "
                         f"{tuple(p_neighbour.shape)}")
    similarity = (p_anchor * p_neighbour).sum(dim=1)                     # (B,)
    consistency = -similarity.clamp_min(_EPS).log().mean()
    entropy = mean_assignment_entropy(p_anchor)
    return consistency - entropy_weight * entropy, consistency, entropy
