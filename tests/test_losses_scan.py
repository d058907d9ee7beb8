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


WEAK = torch.tensor([[0.995, 0.003, 0.002],    # confident, class 0
                     [0.002, 0.996, 0.002],    # confident, class 1
                     [0.997, 0.002, 0.001],    # confident, class 0
                     [0.5, 0.3, 0.2]])         # not confident
STRONG = torch.tensor([[2.0, 0.0, -1.0],
                       [0.5, 1.0, 0.0],
                       [0.0, 1.0, 0.0],
                       [3.0, 0.0, 0.0]])


def _ce(logits, target):
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


@pytest.mark.parametrize("class_balance", [True, False])
def test_confidence_cross_entropy_by_hand(class_balance):
    from losses.scan import confidence_cross_entropy

    rows = [(0, 0), (1, 1), (2, 0)]                 # (row, target) of the confident rows
    ce = [_ce(STRONG[i].tolist(), t) for i, t in rows]
    # 3 confident rows, class 0 twice, class 1 once: weights 3/2, 3/1, 3/2
    weights = [1.5, 3.0, 1.5] if class_balance else [1.0, 1.0, 1.0]
    by_hand = sum(w * c for w, c in zip(weights, ce)) / sum(weights)
    loss, fraction = confidence_cross_entropy(WEAK, STRONG, threshold=0.99, class_balance=class_balance)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert fraction.item() == pytest.approx(0.75)


def test_confidence_cross_entropy_without_a_confident_row_is_zero_with_a_gradient():
    from losses.scan import confidence_cross_entropy

    strong = STRONG.clone().requires_grad_(True)
    loss, fraction = confidence_cross_entropy(WEAK, strong, threshold=0.999)
    assert loss.item() == 0.0 and fraction.item() == 0.0
    loss.backward()
    assert torch.equal(strong.grad, torch.zeros_like(strong))
