"""NT-Xent, the normalised-temperature cross-entropy of SimCLR (Chen et al., ICML 2020).

Also CC's instance-level loss, and (on the columns of the assignment matrices) its cluster-level one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float, symmetric: bool = True) -> torch.Tensor:
    """NT-Xent over the 2N rows of [z1; z2].

    z1, z2: (N, D), row i of z1 and row i of z2 are two views of one sample (the positive pair).
    They need not be normalised: rows are L2-normalised here, so similarities are cosines.
    With s_ij = cos(z_i, z_j) / temperature over the 2N rows, the anchor i's term is
        -log[ exp(s_{i,i+}) / sum_{k != i} exp(s_ik) ]   (i+ = the other view of i),
    i.e. a cross-entropy over the 2N - 1 other rows whose target is the positive.
    symmetric=True (SimCLR's paper, CC): the mean over all 2N anchors.
    symmetric=False (SCAN's SimCLR pretext): only the N rows of z1 are anchors (the denominators
    still run over all 2N rows); the mean over those N.
    Returns a scalar. For a global batch, gather z1 and z2 across ranks (with gradients) first.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)                               # (2N, D)
    logits = z @ z.t() / temperature                                          # (2N, 2N)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))                     # an anchor is not its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # i <-> i + N
    if not symmetric:
        logits, targets = logits[:n], targets[:n]
    return F.cross_entropy(logits, targets)
