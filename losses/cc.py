"""CC's cluster-level loss (Contrastive Clustering, Li et al., AAAI 2021).

The cluster head gives each view an (N, K) matrix of soft assignments (softmax rows). Its K columns
are the clusters' representations over the batch: column k of view a and column k of view b are a
positive pair, the other 2K - 2 columns negatives (NT-Xent on cosine similarities, tau_C = 1.0).
A second term keeps clusters from collapsing: for each view, log K - H(P), with P_k the share of
the batch's assignment mass in cluster k; it is 0 when every cluster gets the same mass.
"""
from __future__ import annotations

import math

import torch

from losses.contrastive import nt_xent_loss


def cluster_contrastive_loss(p1: torch.Tensor, p2: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Symmetric NT-Xent over the 2K columns of p1, p2: (N, K) soft assignments of two views.

    Columns are L2-normalised (cosine similarity); the mean over all 2K anchors. Gather p1, p2
    across ranks (with gradients) first, so the columns span the global batch.
    """
    if p1.shape != p2.shape or p1.dim() != 2:
        raise ValueError(f"p1 and p2 must both be (N, K), got {tuple(p1.shape)} and {tuple(p2.shape)}")
    return nt_xent_loss(p1.t(), p2.t(), temperature=temperature, symmetric=True)


def cluster_entropy_loss(*assignments: torch.Tensor) -> torch.Tensor:
    """sum over the given views of (log K - H(P)), P_k = sum_i p_ik / sum_{i,k} p_ik.

    assignments: one or more (N, K) non-negative soft assignments (softmax rows). Minimising this
    maximises the entropy of the cluster sizes (CC's code; the paper writes -H(P^a) - H(P^b), the
    same up to the constant 2 log K). Each term is in [0, log K].
    """
    if not assignments:
        raise ValueError("cluster_entropy_loss needs at least one (N, K) assignment matrix")
    total = assignments[0].new_zeros(())
    for p in assignments:
        if p.dim() != 2:
            raise ValueError(f"assignments must be (N, K), got {tuple(p.shape)}")
        mass = p.sum(0)
        share = mass / mass.sum()                                             # (K,)
        # 0 log 0 = 0: an empty cluster contributes no entropy (and no NaN gradient)
        plogp = torch.where(share > 0, share * torch.log(share.clamp_min(1e-30)), torch.zeros_like(share))
        total = total + math.log(p.shape[1]) + plogp.sum()
    return total
