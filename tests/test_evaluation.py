"""kNN monitor and linear probe on synthetic features; evaluation-only runs of a saved checkpoint."""
import json
import math

import pytest
import torch

from utils.evaluation import knn_accuracy, knn_predict, linear_probe


def separable(n_per_class: int, num_classes: int = 5, dim: int = 16, seed: int = 0, noise: float = 0.1):
    """Clusters around random unit directions: (n, dim) features, (n,) labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return feats[perm], labels[perm]


def brute_force_knn(train, train_labels, queries, *, k, temperature, num_classes, leave_one_out=False):
    predictions = []
    for i, q in enumerate(queries):
        scores = []
        for j, m in enumerate(train):
            if leave_one_out and i == j:
                continue
            sim = float(q @ m) / (float(q.norm()) * float(m.norm()))
            scores.append((sim, int(train_labels[j])))
        scores.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, label in scores[:k]:
            votes[label] += math.exp(sim / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(predictions)


def test_knn_separable_features_are_near_perfect_and_shuffled_labels_are_chance():
    train, train_labels = separable(100, seed=0)
    test, test_labels = separable(40, seed=0)  # same centres (same seed), fresh permutation
    test = test + 0.05 * torch.randn_like(test)
    assert knn_accuracy(train, train_labels, test, test_labels, k=20, num_classes=5) > 0.98
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(1))]
    acc = knn_accuracy(train, shuffled, test, test_labels, k=20, num_classes=5)
    assert 0.05 < acc < 0.4  # chance is 0.2


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_knn_matches_brute_force_and_chunking_does_not_change_it(leave_one_out):
    g = torch.Generator().manual_seed(3)
    train, train_labels = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    queries = train.clone() if leave_one_out else torch.randn(17, 4, generator=g)
    reference = brute_force_knn(train, train_labels, queries, k=5, temperature=0.5, num_classes=3,
                                leave_one_out=leave_one_out)
    for chunk in (1, 4, 7, 1000):
        got = knn_predict(train, train_labels, queries, k=5, temperature=0.5, num_classes=3, chunk_size=chunk,
                          leave_one_out=leave_one_out)
        assert torch.equal(got, reference), chunk


def test_knn_leave_one_out_excludes_the_query_itself():
    # Each point's only neighbour of its own label is itself: with it excluded, 1-NN is always wrong.
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 0, 1])
    assert knn_accuracy(feats, labels, feats, labels, k=1, num_classes=2) == 1.0
    assert knn_accuracy(feats, labels, feats, labels, k=1, num_classes=2, leave_one_out=True) == 0.0


def test_linear_probe_separable_is_near_perfect_and_shuffled_labels_are_chance():
    train, train_labels = separable(200, dim=32, seed=0, noise=0.1)
    test, test_labels = separable(100, dim=32, seed=0, noise=0.1)
    assert linear_probe(train, train_labels, test, test_labels, epochs=30, lr=0.01, batch_size=256, seed=0) > 0.98
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(1))]
    acc = linear_probe(train, shuffled, test, test_labels, epochs=30, lr=0.01, batch_size=256, seed=0)
    assert 0.05 < acc < 0.4
    # Deterministic for a seed.
    again = linear_probe(train, train_labels, test, test_labels, epochs=5, lr=0.01, batch_size=256, seed=4)
    assert again == linear_probe(train, train_labels, test, test_labels, epochs=5, lr=0.01, batch_size=256, seed=4)


def test_knn_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="features"):
        knn_accuracy(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 4),
                     torch.zeros(2, dtype=torch.long), num_classes=2)
