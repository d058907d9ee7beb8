"""SimSiam's loss (Chen & He, CVPR 2021): negative cosine with a stop-gradient on the target side."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -mean_i cos(p_i, sg(z_i)).

    prediction, target: (B, D). The target is detached here: the stop-gradient is what keeps SimSiam
    from collapsing, so it is part of the loss, not left to the caller.
    """
    if prediction.shape != target.shape or prediction.dim() != 2:
        raise ValueError(f"prediction and target must both be (B, D), got {tuple(prediction.shape)} "
                         f"and {tuple(target.shape)}")
    return -F.cosine_similarity(prediction, target.detach(), dim=1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric SimSiam loss 1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)), in [-1, 1].

    p1, p2: (B, D) predictor outputs of views 1 and 2; z1, z2: (B, D) their projections.
    """
    return 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
