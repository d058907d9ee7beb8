"""SCAN's loss against values worked out by hand on a 4 x 3 batch."""
import math

import pytest
import torch

from losses.scan import mean_assignment_entropy, scan_loss

P_ANCHOR = torch.tensor([[0.5, 0.25, 0.25],
                         [1.0, 0.0, 0.0],
                         [0.0, 0.5, 0.5],
                         [0.2, 0.2, 0.6]])
P_NEIGHBOUR = torch.tensor([[0.5, 0.5, 0.0],
                            [0.5, 0.25, 0.25],
                            [0.0, 0.0, 1.0],
                            [0.0, 0.0, 1.0]])


def test_scan_loss_by_hand():
    # inner products: 0.25 + 0.125 = 0.375; 0.5; 0.5; 0.6
    consistency_by_hand = -(math.log(0.375) + math.log(0.5) + math.log(0.5) + math.log(0.6)) / 4
    # mean anchor row: (1.7 / 4, 0.95 / 4, 1.35 / 4)
    mean = [0.425, 0.2375, 0.3375]
    entropy_by_hand = -sum(m * math.log(m) for m in mean)
    total, consistency, entropy = scan_loss(P_ANCHOR, P_NEIGHBOUR, entropy_weight=5.0)
    assert consistency.item() == pytest.approx(consistency_by_hand, rel=1e-6)
    assert entropy.item() == pytest.approx(entropy_by_hand, rel=1e-6)
    assert total.item() == pytest.approx(consistency_by_hand - 5.0 * entropy_by_hand, rel=1e-6)
    assert mean_assignment_entropy(P_ANCHOR).item() == pytest.approx(entropy_by_hand, rel=1e-6)


def test_disjoint_pairs_and_collapse_stay_finite():
    anchor = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    neighbour = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    total, consistency, entropy = scan_loss(anchor, neighbour, entropy_weight=2.0)
    assert consistency.item() == pytest.approx(-math.log(1e-8))   # clamped, not inf
    assert entropy.item() == pytest.approx(0.0, abs=1e-6)         # one cluster holds everything
    total.backward()
    assert torch.isfinite(anchor.grad).all()


def test_scan_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"must both be \(B, K\), got \(4, 3\) and \(4, 2\)"):
        scan_loss(P_ANCHOR, P_NEIGHBOUR[:, :2], entropy_weight=1.0)
