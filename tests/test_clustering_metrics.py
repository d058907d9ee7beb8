"""torch_clustering.evaluate_clustering: NMI and ARI against scikit-learn, ACC against a brute-force
search over one-to-one cluster-to-class maps."""
import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from torch_clustering import evaluate_clustering


def brute_force_acc(labels_true, labels_pred):
    """Best fraction of points whose cluster maps to their class, over every one-to-one map between
    clusters and classes (clusters or classes left unmatched count as wrong)."""
    classes, clusters = np.unique(labels_true), np.unique(labels_pred)
    best = 0
    if len(clusters) <= len(classes):
        for image in itertools.permutations(classes, len(clusters)):
            mapping = dict(zip(clusters, image))
            best = max(best, sum(mapping[p] == t for t, p in zip(labels_true, labels_pred)))
    else:
        for image in itertools.permutations(clusters, len(classes)):
            mapping = dict(zip(image, classes))
            best = max(best, sum(mapping.get(p) == t for t, p in zip(labels_true, labels_pred)))
    return best / len(labels_true)


# (n, classes, clusters): as many clusters as classes, more clusters than classes, fewer.
SHAPES = [(40, 3, 3), (60, 4, 4), (50, 3, 6), (30, 2, 5), (45, 5, 3), (25, 4, 1)]


@pytest.mark.parametrize("n,n_classes,n_clusters", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_against_sklearn_and_brute_force(n, n_classes, n_clusters, seed):
    rng = np.random.default_rng(seed)
    labels_true = rng.integers(n_classes, size=n)
    # Correlated with the truth, so the scores are not all near zero.
    labels_pred = np.where(rng.random(n) < 0.6, labels_true % n_clusters, rng.integers(n_clusters, size=n))
    scores = evaluate_clustering(labels_true, labels_pred)
    assert set(scores) == {"nmi", "acc", "ari"} and all(isinstance(v, float) for v in scores.values())
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(labels_true, labels_pred), abs=1e-12)
    assert scores["ari"] == pytest.approx(adjusted_rand_score(labels_true, labels_pred), abs=1e-12)
    assert scores["acc"] == pytest.approx(brute_force_acc(labels_true, labels_pred), abs=1e-12)


def test_more_clusters_than_classes_counts_unmatched_clusters_wrong():
    # Class 0 split in two clusters: one of them cannot be matched, so its 2 points are wrong.
    labels_true = [0, 0, 0, 0, 1, 1, 1, 1]
    labels_pred = [5, 5, 7, 7, 2, 2, 2, 2]
    assert evaluate_clustering(labels_true, labels_pred)["acc"] == pytest.approx(6 / 8)


def test_permuted_labels_score_one_and_inputs_may_be_tensors_or_arrays():
    labels_true = np.array([0, 0, 1, 1, 2, 2, 2])
    labels_pred = torch.tensor([2, 2, 0, 0, 1, 1, 1])
    for pred in (labels_pred, labels_pred.numpy(), labels_pred.tolist(), labels_pred.to(torch.int32)):
        assert evaluate_clustering(torch.from_numpy(labels_true), pred) == pytest.approx(
            {"nmi": 1.0, "acc": 1.0, "ari": 1.0})


def test_arbitrary_label_values():
    labels_true = np.array([-3, -3, 10, 10, 10, 4])
    labels_pred = np.array([100, 7, 7, 7, -1, -1])
    scores = evaluate_clustering(labels_true, labels_pred)
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(labels_true, labels_pred), abs=1e-12)
    assert scores["ari"] == pytest.approx(adjusted_rand_score(labels_true, labels_pred), abs=1e-12)
    assert scores["acc"] == pytest.approx(brute_force_acc(labels_true, labels_pred), abs=1e-12)


@pytest.mark.parametrize("labels_true,labels_pred", [([0, 0, 0], [1, 1, 1]), ([0, 1, 2], [0, 0, 0]),
                                                     ([0, 0, 0], [0, 1, 2]), ([0, 1, 2], [2, 0, 1])])
def test_degenerate_labellings_agree_with_sklearn(labels_true, labels_pred):
    scores = evaluate_clustering(labels_true, labels_pred)
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(labels_true, labels_pred), abs=1e-12)
    assert scores["ari"] == pytest.approx(adjusted_rand_score(labels_true, labels_pred), abs=1e-12)
    assert scores["acc"] == pytest.approx(brute_force_acc(labels_true, labels_pred), abs=1e-12)


def set_partitions(n: int) -> list[tuple[int, ...]]:
    """Every way to split n points into groups, each once (restricted growth strings: a point's label is at
    most one more than the largest label before it)."""
    partitions = [()]
    for _ in range(n):
        partitions = [p + (label,) for p in partitions for label in range(max(p, default=-1) + 2)]
    return partitions


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_pair_of_labellings_of_a_few_points_agrees_with_sklearn(n):
    """The special cases (one point, one cluster, all singletons, pairs that cannot be counted) by exhaustion:
    every pair of partitions of n points, the second one's cluster ids shifted so that ids do not line up."""
    for labels_true in set_partitions(n):
        for partition in set_partitions(n):
            labels_pred = [7 - label for label in partition]
            scores = evaluate_clustering(labels_true, labels_pred)
            where = f"{labels_true} vs {labels_pred}"
            assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(labels_true, labels_pred),
                                                  abs=1e-12), where
            assert scores["ari"] == pytest.approx(adjusted_rand_score(labels_true, labels_pred), abs=1e-12), where
            assert scores["acc"] == pytest.approx(brute_force_acc(labels_true, labels_pred), abs=1e-12), where


@pytest.mark.parametrize("labels_true,labels_pred,match", [
    ([0, 1, 1], [0, 1], "differ in length"),
    ([[0, 1]], [[0, 1]], "1-D"),
    ([], [], "empty"),
])
def test_bad_labels_raise_value_error(labels_true, labels_pred, match):
    with pytest.raises(ValueError, match=match):
        evaluate_clustering(labels_true, labels_pred)
