"""MoCo's InfoNCE (He et al., CVPR 2020; v2: Chen et al., 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over i of -log[exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_j exp(q_i.queue_j / t))].

    q: (B, D) L2-normalised queries (with gradient); k: (B, D) normalised keys of the other view, the
    positives (no gradient: detach before calling if needed); queue: (K, D) normalised keys of past
    batches, the negatives. A cross-entropy over B rows of 1 + K logits whose target is column 0.
    """
    if q.shape != k.shape or q.dim() != 2:
        raise ValueError(f"q and k must both be (B, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must be (K, {q.shape[1]}), got {tuple(queue.shape)}")
    positives = (q * k.to(q.dtype)).sum(dim=1, keepdim=True)                # (B, 1)
    negatives = q @ queue.to(q.dtype).t()                                  # (B, K)
    logits = torch.cat([positives, negatives], dim=1) / temperature
    targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, targets)
