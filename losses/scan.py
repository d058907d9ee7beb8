"""SCAN's clustering loss (Van Gansbeke et al., ECCV 2020).

An image and one of its mined neighbours should land in the same cluster with confidence: the
consistency term is -mean_i log <p(x_i), p(n_i)>, the inner product of the two softmax rows. Alone
it is minimised by putting every image in one cluster, so the entropy of the batch's mean
assignment, H((1/B) sum_i p(x_i)), is subtracted with a weight (5.0 in every SCAN config).
Self-labelling then trains the strongly augmented view to predict the confident argmax of the clean
view, with classes weighted inversely to how often they are confident targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# SCAN's reference clamps the same way: log of an inner product or a share below this is taken at it,
# so a collapsed head gives a large finite loss, not inf or NaN gradients.
_EPS = 1e-8


def mean_assignment_entropy(p: torch.Tensor) -> torch.Tensor:
    """H of the mean row of p (B, K) softmax rows: -sum_k m_k log m_k, m = mean_i p_i; in [0, log K]."""
    if p.dim() != 2:
        raise ValueError(f"p must be (B, K) soft assignments, got {tuple(p.shape)}")
    mean = p.mean(dim=0).clamp_min(_EPS)
    return -(mean * mean.log()).sum()


def pair_consistency(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """-(1/B) sum_i log <p_i, q_i> for p, q (B, K) softmax rows: pairs that should share a cluster."""
    return -(p * q).sum(dim=1).clamp_min(_EPS).log().mean()


def scan_loss_over_pairs(probabilities: torch.Tensor, neighbours: torch.Tensor, *, entropy_weight: float,
                         chunk_size: int = 4096) -> float:
    """SCAN's loss of one head over a whole set (SCAN's validation loss, which selects the head):
    probabilities (N, K) softmax rows, neighbours (N, M) rows of each image's listed neighbours (itself
    excluded); the consistency term averages over all N x M pairs, the entropy is that of the mean row.
    Computed in float64, chunk by chunk."""
    p = probabilities.double()
    total, count = 0.0, 0
    for start in range(0, p.shape[0], chunk_size):
        rows = neighbours[start:start + chunk_size].to(p.device)                  # (c, M)
        similarity = torch.einsum("ck,cmk->cm", p[start:start + chunk_size], p[rows])
        total += float(similarity.clamp_min(_EPS).log().sum())
        count += similarity.numel()
    return -total / max(1, count) - entropy_weight * float(mean_assignment_entropy(p))


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
    consistency = pair_consistency(p_anchor, p_neighbour)
    entropy = mean_assignment_entropy(p_anchor)
    return consistency - entropy_weight * entropy, consistency, entropy


def confidence_cross_entropy(weak_probabilities: torch.Tensor, strong_logits: torch.Tensor, *, threshold: float,
                             class_balance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """SCAN's self-labelling loss: (loss, fraction of confident rows).

    weak_probabilities (B, K): softmax rows of the clean views (targets; no gradient flows into them);
    strong_logits (B, K): logits of the augmented views. Row i is confident when max_k p_ik > threshold,
    with target y_i = argmax_k p_ik; loss = sum_i w_i CE(strong_i, y_i) / sum_i w_i over confident rows,
    w_i = n / n_{y_i} (n confident rows, n_c of them with target c) with `class_balance`, else 1. With no
    confident row the loss is 0 (SCAN's reference raises there). Gather both across ranks first so
    that the counts are the global batch's.
    """
    if weak_probabilities.shape != strong_logits.shape or strong_logits.dim() != 2:
        raise ValueError(f"weak_probabilities and strong_logits must both be (B, K), got "
                         f"{tuple(weak_probabilities.shape)} and {tuple(strong_logits.shape)}")
    confidence, target = weak_probabilities.detach().max(dim=1)
    confident = (confidence > threshold).to(strong_logits.dtype)                 # (B,)
    weights = confident
    if class_balance:  # no branch on the count: no device synchronisation
        counts = torch.bincount(target, weights=confident, minlength=strong_logits.shape[1])   # (K,)
        weights = confident * confident.sum() / counts[target].clamp_min(1.0)
    per_row = F.cross_entropy(strong_logits, target, reduction="none")
    loss = (weights * per_row).sum() / weights.sum().clamp_min(1e-12)
    return loss, confident.mean()
