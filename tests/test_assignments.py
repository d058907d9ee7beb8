"""utils.assignments.class_matching: the (class, cluster) confusion and the matching ACC scores."""
import itertools

import pytest
import torch
from sklearn.metrics import confusion_matrix

from data.datasets import ImageData
from utils.assignments import class_matching


def labelled(labels: list[int], num_classes: int) -> ImageData:
    """Blank 1x1 images with `labels` (-1 = unknown)."""
    n = len(labels)
    return ImageData(name="t", labels=torch.tensor(labels), num_classes=num_classes,
                     class_names=[f"c{i}" for i in range(num_classes)], mean=(0.0,), std=(1.0,), channels=1,
                     image_size=1, images=torch.zeros(n, 1, 1, 1, dtype=torch.uint8))


def best_matched_total(confusion: list[list[int]]) -> int:
    """Brute force over every one-to-one map between classes and clusters."""
    c, k = len(confusion), len(confusion[0])
    if c <= k:
        return max(sum(confusion[i][j] for i, j in enumerate(cols)) for cols in itertools.permutations(range(k), c))
    return max(sum(confusion[i][j] for j, i in enumerate(rows)) for rows in itertools.permutations(range(c), k))


def test_hand_computed_case_with_more_clusters_than_classes():
    data = labelled([0, 0, 0, 1, 1, 2, 2, 2, 2, -1], 3)
    got = class_matching(torch.tensor([1, 1, 0, 0, 0, 2, 2, 2, 3, 3]), data, 4)
    assert got == {"class_names": ["c0", "c1", "c2"], "confusion": [[1, 2, 0, 0], [2, 0, 0, 0], [0, 0, 3, 1]],
                   "cluster_class": [1, 0, 2, -1], "class_accuracy": [pytest.approx(2 / 3), 1.0, 0.75]}


def test_fewer_clusters_than_classes_leave_a_class_unmatched():
    got = class_matching(torch.tensor([0, 0, 1, 1, 1, 0]), labelled([0, 0, 1, 1, 2, 2], 3), 2)
    assert got["confusion"] == [[2, 0], [0, 2], [1, 1]]
    assert got["cluster_class"] == [0, 1] and got["class_accuracy"] == [1.0, 1.0, 0.0]


def test_a_class_without_images_takes_no_cluster():
    # Three clusters, three classes, none of class 1: cluster 2 stays unmatched rather than going to it.
    got = class_matching(torch.tensor([0, 1, 1, 1, 2]), labelled([0, 0, 2, 2, 2], 3), 3)
    assert got["confusion"] == [[1, 1, 0], [0, 0, 0], [0, 2, 1]]
    assert got["cluster_class"] == [0, 2, -1]  # class 2 is best matched to cluster 1 (2 images)
    assert got["class_accuracy"] == [0.5, None, pytest.approx(2 / 3)]


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_against_scikit_learn_and_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    num_classes, k = 3 + seed % 2, 2 + seed % 4
    labels = torch.randint(-1, num_classes, (20,), generator=g)
    clusters = torch.randint(0, k, (20,), generator=g)
    got = class_matching(clusters, labelled(labels.tolist(), num_classes), k)
    known = labels >= 0
    size = max(num_classes, k)
    expected = confusion_matrix(labels[known], clusters[known], labels=list(range(size)))[:num_classes, :k]
    assert got["confusion"] == expected.tolist()
    matched = [(cls, cluster) for cluster, cls in enumerate(got["cluster_class"]) if cls >= 0]
    present = sum(1 for row in expected if row.sum())
    assert len(matched) == min(present, k) and len({cls for cls, _ in matched}) == len(matched)
    assert sum(expected[cls][cluster] for cls, cluster in matched) == best_matched_total(expected.tolist())


def test_unlabeled_data_has_no_matching_and_a_wrong_length_is_an_error():
    assert class_matching(torch.tensor([0, 1, 1]), labelled([-1, -1, -1], 2), 2) is None
    with pytest.raises(ValueError, match="^class matching: 2 cluster ids for 3 images$"):
        class_matching(torch.tensor([0, 1]), labelled([0, 1, 1], 2), 2)
