"""utils.assignments: the (class, cluster) confusion and the matching ACC scores (class_matching), the
cluster sizes a collapse shows in, and the per-image files (clusters.csv, features.npz) read back."""
import csv
import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from data.datasets import ImageData
from utils.assignments import (class_matching, cluster_size_stats, format_cluster_sizes, write_cluster_assignments,
                               write_features)


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


def test_cluster_ids_beyond_num_clusters_widen_the_matching():
    """A read-out with more clusters than it was asked for (ids up to 3 with num_clusters 2): K is the
    largest id + 1, and a cluster is matched however far out its id is."""
    got = class_matching(torch.tensor([0, 3, 3, 1]), labelled([0, 1, 1, 0], 2), 2)
    assert got["confusion"] == [[1, 1, 0, 0], [0, 0, 0, 2]]
    assert got["cluster_class"][3] == 1 and got["class_accuracy"][1] == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_cluster_sizes_against_numpy(seed):
    g = torch.Generator().manual_seed(seed)
    num_clusters = 3 + seed
    top = num_clusters + 2 if seed % 2 else num_clusters - 1  # ids past K (odd seeds), an empty cluster (even)
    clusters = torch.randint(0, top, (1 + 10 * seed,), generator=g)
    counts = np.bincount(clusters.numpy(), minlength=num_clusters)
    got = cluster_size_stats(clusters, num_clusters)
    assert got == {"empty_clusters": int((counts == 0).sum()), "largest_cluster_fraction": counts.max() / len(clusters),
                   "smallest_cluster_fraction": counts.min() / len(clusters)}


def test_cluster_sizes_by_hand_and_refused_shapes():
    # 8 images over K = 4: sizes 5, 0, 2, 1
    sizes = cluster_size_stats(torch.tensor([0, 0, 2, 0, 3, 0, 2, 0]), 4)
    assert sizes == {"empty_clusters": 1, "largest_cluster_fraction": 0.625, "smallest_cluster_fraction": 0.0}
    assert format_cluster_sizes(sizes) == "largest cluster 62.5%, smallest 0.0%, 1 empty"
    assert format_cluster_sizes(cluster_size_stats(torch.tensor([1, 0, 1, 1]), 2)) == (
        "largest cluster 75.0%, smallest 25.0%, 0 empty")
    for bad in (torch.zeros(0, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"^cluster ids: expected a non-empty \(N,\) tensor, got shape"):
            cluster_size_stats(bad, 2)


def with_files(labels: list[int]) -> ImageData:
    """Blank images that also name their files (as a folder dataset's do), one name with a comma and one
    with a non-ASCII letter."""
    data = labelled(labels, 3)
    data.files = [f"dir/img{i}{',x' if i == 1 else ''}{'é' if i == 2 else ''}.png" for i in range(len(labels))]
    return data


@pytest.mark.parametrize("named", [False, True], ids=["images", "files"])
def test_clusters_csv_reads_back_as_written(tmp_path, named):
    labels = [2, -1, 0, 1, 1]
    data = with_files(labels) if named else labelled(labels, 3)
    clusters = torch.tensor([[4], [0], [3], [3], [1]])  # any shape with N ids
    write_cluster_assignments(tmp_path / "clusters.csv", clusters, data)
    with open(tmp_path / "clusters.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", "cluster", "label"] + (["file"] if named else [])
    expected = [[str(i), str(c), str(y)] + ([data.files[i]] if named else [])
                for i, (c, y) in enumerate(zip([4, 0, 3, 3, 1], labels))]
    assert rows[1:] == expected
    with pytest.raises(ValueError, match=r"clusters.csv: 4 cluster ids for 5 images$"):
        write_cluster_assignments(tmp_path / "clusters.csv", clusters[:4], data)
    with open(tmp_path / "clusters.csv", newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == rows  # the refused write left the file as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clusters.csv"]


@pytest.mark.parametrize("named", [False, True], ids=["images", "files"])
def test_features_npz_reads_back_as_written(tmp_path, named):
    labels = [2, -1, 0]
    data = with_files(labels) if named else labelled(labels, 3)
    features = torch.arange(12, dtype=torch.float64).reshape(3, 4) / 7
    write_features(tmp_path / "f.npz", features.requires_grad_(), data, "backbone")
    with np.load(tmp_path / "f.npz") as saved:
        assert sorted(saved.files) == sorted(["features", "labels", "kind"] + (["files"] if named else []))
        assert saved["features"].dtype == np.float32 and saved["labels"].dtype == np.int64
        np.testing.assert_array_equal(saved["features"], features.detach().float().numpy())
        np.testing.assert_array_equal(saved["labels"], labels)
        assert str(saved["kind"]) == "backbone"
        if named:
            assert saved["files"].tolist() == data.files
    for bad in (features[:2], features[:, 0]):
        with pytest.raises(ValueError, match=rf"f2.npz: features of shape \({bad.shape[0]},"):
            write_features(tmp_path / "f2.npz", bad, data, "backbone")
    assert not (tmp_path / "f2.npz").exists()
