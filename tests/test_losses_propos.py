"""ProPos's losses against values computed by hand (plain Python floats, loops over clusters)."""
import math

import pytest
import torch

from losses.propos import byol_alignment_loss, prototype_scattering_loss


def _normalise(rows):
    return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in rows]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _hand_psl(q, k, labels, temperature):
    """The paper's formula, one present cluster at a time, with explicit sums."""
    clusters = sorted(set(labels))
    mu, nu = {}, {}
    for c in clusters:
        members = [i for i, l in enumerate(labels) if l == c]
        mu[c] = _normalise([[sum(q[i][d] for i in members) for d in range(len(q[0]))]])[0]
        nu[c] = _normalise([[sum(k[i][d] for i in members) for d in range(len(k[0]))]])[0]
    losses = []
    for c in clusters:
        pos = _dot(mu[c], nu[c]) / temperature
        denom = math.exp(pos) + sum(math.exp(_dot(mu[c], mu[j]) / temperature) for j in clusters if j != c)
        losses.append(-pos + math.log(denom))
    return sum(losses) / len(losses)


Q = [[0.9, 0.1, -0.2], [0.7, 0.3, 0.1], [-0.2, 1.0, 0.4], [0.1, -0.5, 0.8]]
K = [[1.0, 0.0, 0.1], [0.6, 0.5, -0.1], [0.0, 0.9, 0.6], [0.3, -0.4, 0.9]]


@pytest.mark.parametrize("labels,num_clusters", [([0, 0, 1, 2], 3), ([2, 0, 2, 0], 4), ([1, 1, 1, 3], 5)])
def test_prototype_scattering_matches_hand_computation(labels, num_clusters):
    q, k = _normalise(Q), _normalise(K)
    got = prototype_scattering_loss(torch.tensor(q), torch.tensor(k), torch.tensor(labels),
                                    num_clusters=num_clusters, temperature=0.5)
    assert got.item() == pytest.approx(_hand_psl(q, k, labels, 0.5), rel=1e-5)


def test_prototype_scattering_single_member_prototype_is_the_sample():
    # cluster 1 has one member: its prototype must be that sample itself
    q, k = _normalise(Q), _normalise(K)
    labels = [0, 0, 0, 1]
    got = prototype_scattering_loss(torch.tensor(q), torch.tensor(k), torch.tensor(labels), num_clusters=2,
                                    temperature=0.5)
    mu0 = _normalise([[sum(q[i][d] for i in range(3)) for d in range(3)]])[0]
    nu0 = _normalise([[sum(k[i][d] for i in range(3)) for d in range(3)]])[0]
    mu1, nu1 = q[3], k[3]
    l0 = -_dot(mu0, nu0) / 0.5 + math.log(math.exp(_dot(mu0, nu0) / 0.5) + math.exp(_dot(mu0, mu1) / 0.5))
    l1 = -_dot(mu1, nu1) / 0.5 + math.log(math.exp(_dot(mu1, nu1) / 0.5) + math.exp(_dot(mu1, mu0) / 0.5))
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-5)


def test_prototype_scattering_gradient_flows_to_online_only():
    q = torch.nn.functional.normalize(torch.randn(6, 4), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    loss = prototype_scattering_loss(q, k, torch.tensor([0, 1, 1, 2, 2, 2]), num_clusters=3, temperature=0.5)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_byol_alignment_matches_hand_computation():
    p, z = torch.tensor(Q), torch.tensor(K)
    expected = sum(2 - 2 * _dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b)) for a, b in zip(Q, K)) / 4
    assert byol_alignment_loss(p, z).item() == pytest.approx(expected, rel=1e-6)


def test_prototype_scattering_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="labels"):
        prototype_scattering_loss(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1]), num_clusters=2,
                                  temperature=0.5)
