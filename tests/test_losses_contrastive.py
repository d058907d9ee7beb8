"""NT-Xent and CC's cluster-level terms against values computed by hand on tiny tensors."""
import math

import pytest
import torch

from losses.cc import cluster_contrastive_loss, cluster_entropy_loss
from losses.contrastive import nt_xent_loss

E = math.exp


def test_nt_xent_orthogonal_pairs():
    # a1 = b1 = e1, a2 = b2 = e2: each anchor has cosine 1 to its positive and 0 to both negatives
    z = torch.eye(2)
    for t in (1.0, 0.5):
        expected = -1 / t + math.log(E(1 / t) + 2)
        assert nt_xent_loss(z, z.clone(), temperature=t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_known_similarities_and_normalisation():
    # rows a1 = (1, 0), a2 = (0, 1), b1 = (0.6, 0.8), b2 = (0, 2) -> (0, 1) once normalised. Cosines:
    # a1.a2 = 0, a1.b1 = 0.6, a1.b2 = 0, a2.b1 = 0.8, a2.b2 = 1, b1.b2 = 0.8
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.6, 0.8], [0.0, 2.0]])
    a1 = -0.6 + math.log(E(0.6) + E(0) + E(0))          # positive b1; negatives a2, b2
    a2 = -1.0 + math.log(E(1.0) + E(0) + E(0.8))        # positive b2; negatives a1, b1
    b1 = -0.6 + math.log(E(0.6) + E(0.8) + E(0.8))      # positive a1; negatives a2, b2
    b2 = -1.0 + math.log(E(1.0) + E(0) + E(0.8))        # positive a2; negatives a1, b1
    assert nt_xent_loss(z1, z2, temperature=1.0).item() == pytest.approx((a1 + a2 + b1 + b2) / 4, rel=1e-6)
    # SCAN's one-directional form: only the first view's rows are anchors
    assert nt_xent_loss(z1, z2, temperature=1.0, symmetric=False).item() == pytest.approx((a1 + a2) / 2, rel=1e-6)
    # temperature divides every cosine
    a1_t = -0.6 / 0.5 + math.log(E(0.6 / 0.5) + 2)
    a2_t = -1.0 / 0.5 + math.log(E(1.0 / 0.5) + 1 + E(0.8 / 0.5))
    assert nt_xent_loss(z1, z2, temperature=0.5, symmetric=False).item() == pytest.approx((a1_t + a2_t) / 2, rel=1e-6)


def test_nt_xent_rejects_bad_shapes_and_temperatures():
    with pytest.raises(ValueError, match="must both be"):
        nt_xent_loss(torch.zeros(3, 2), torch.zeros(2, 2), temperature=0.5)
    for temperature in (0.0, -0.5):  # zero would divide the cosines by zero, not fail
        with pytest.raises(ValueError, match=f"temperature must be > 0, got {temperature}"):
            nt_xent_loss(torch.ones(3, 2), torch.ones(3, 2), temperature=temperature)


def test_cluster_contrast_over_columns():
    # both views' assignment columns are c1 = (1, 0, .5), c2 = (0, 1, .5): cos(c1, c2) = .25 / 1.25 = .2,
    # each column's positive (the same cluster in the other view) has cosine 1
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    expected = -1.0 + math.log(E(1.0) + 2 * E(0.2))   # the same for all 2K = 4 column anchors
    assert cluster_contrastive_loss(p, p.clone(), temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # a different temperature divides the cosines
    expected_t = -2.0 + math.log(E(2.0) + 2 * E(0.4))
    assert cluster_contrastive_loss(p, p.clone(), temperature=0.5).item() == pytest.approx(expected_t, rel=1e-6)


def test_cluster_contrast_uses_columns_not_rows():
    # 3 rows, 2 columns: a row-wise contrast would have 6 anchors and a different value
    p1 = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    p2 = torch.tensor([[0.7, 0.3], [0.1, 0.9], [0.5, 0.5]])
    c = torch.nn.functional.normalize(torch.cat([p1.t(), p2.t()]), dim=1)   # (4, 3)
    s = (c @ c.t()).tolist()
    expected = 0.0
    for i, pos in ((0, 2), (1, 3), (2, 0), (3, 1)):
        others = [E(s[i][k]) for k in range(4) if k != i]
        expected += -s[i][pos] + math.log(sum(others))
    assert cluster_contrastive_loss(p1, p2).item() == pytest.approx(expected / 4, rel=1e-6)


def test_cluster_entropy_term_by_hand():
    # cluster masses (2.5, 1.5) of 4 -> P = (.625, .375); term = log 2 - H(P) = log 2 + sum P log P
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    one = math.log(2) + 0.625 * math.log(0.625) + 0.375 * math.log(0.375)
    assert cluster_entropy_loss(p).item() == pytest.approx(one, rel=1e-5)
    uniform = torch.full((5, 3), 1 / 3)
    assert cluster_entropy_loss(p, uniform).item() == pytest.approx(one, rel=1e-5)   # uniform adds 0
    assert cluster_entropy_loss(p, p).item() == pytest.approx(2 * one, rel=1e-5)


def test_cluster_entropy_of_a_collapse_is_log_k_with_finite_gradient():
    p = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    loss = cluster_entropy_loss(p)
    assert loss.item() == pytest.approx(math.log(3), rel=1e-6)
    loss.backward()
    assert torch.isfinite(p.grad).all()
