"""DCCM's losses (Wu et al., ICCV 2019): a pseudo-graph, pseudo-labels and local mutual information.

Targets come from predictions p of clean images (no gradient): the graph W_ij = 1 when the cosine of
p_i and p_j is at least a threshold (0.95), the label y_i = argmax p_i, trusted when max p_i reaches a
second threshold (0.9). The augmented images' predictions p' are trained so that their similarity
matrix reproduces W and their rows the trusted labels; a critic scores pairs of (local feature map of
image i, logits of image j), and mutual information between them is raised for graph-linked pairs
(Jensen-Shannon estimator of Deep InfoMax) against the unlinked ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-7


def pseudo_graph(p: torch.Tensor, *, threshold: float) -> torch.Tensor:
    """(B, B) float 0/1: 1 where cos(p_i, p_j) >= threshold (the diagonal included); p (B, K) rows."""
    unit = F.normalize(p, dim=1)
    return (unit @ unit.t() >= threshold).to(p.dtype)


def graph_loss(p: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
    """Mean over all (i, j) of BCE(S_ij / max S, W_ij), S_ij = cos(p_i, p_j): p (B, K), graph W (B, B)."""
    unit = F.normalize(p, dim=1)
    similarity = unit @ unit.t()
    scaled = (similarity / similarity.max().clamp_min(_EPS)).clamp(_EPS, 1 - _EPS)
    return F.binary_cross_entropy(scaled, graph)


def pseudo_label_loss(p: torch.Tensor, targets: torch.Tensor, trusted: torch.Tensor) -> torch.Tensor:
    """mean_i trusted_i * mean_k BCE(p_ik, onehot(targets_i)_k): p (B, K) probabilities, targets (B,) int,
    trusted (B,) 0/1 (rows whose clean prediction was confident enough)."""
    onehot = F.one_hot(targets, p.shape[1]).to(p.dtype)
    per_row = F.binary_cross_entropy(p.clamp(_EPS, 1 - _EPS), onehot, reduction="none").mean(dim=1)
    return (trusted.to(p.dtype) * per_row).mean()


def jsd_mutual_information_loss(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> torch.Tensor:
    """-(E_pos[-softplus(-T)] - E_neg[softplus(T)]), the negated Jensen-Shannon MI estimate of Deep InfoMax:
    critic scores T (P, H, W) of linked (local map, code) pairs and (Q, H, W) of unlinked ones, averaged
    over pairs and positions; with no unlinked pair (Q = 0) that side is 0."""
    negative = F.softplus(negative_scores).mean() if negative_scores.numel() else negative_scores.new_zeros(())
    return F.softplus(-positive_scores).mean() + negative
