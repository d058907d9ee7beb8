"""The run's answer for every image, written beside the run's checkpoints: its cluster as CSV, and
its features as `.npz`.

`clusters.csv` (after training) and `CHECKPOINT.clusters.csv` (`main.py --eval cluster`) hold one
row per image of the evaluation set, in dataset order: `index`, `cluster` (the method's read-out:
k-means of the evaluation features, or the head's argmax), `label` (-1 where the data have none,
e.g. an unlabeled image folder) and, for datasets read from files, `file`.
`CHECKPOINT.features.npz` (`main.py --eval features`) holds the same images' features in the same
order, for plots (t-SNE, UMAP) and for clustering them with other tools.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from data.datasets import ImageData
from utils.checkpoint import write_file_atomic, write_text_atomic


def write_cluster_assignments(path: Path, clusters: torch.Tensor, data: ImageData) -> None:
    """Write `clusters` (N,) int, the cluster of each image of `data` (N images), to `path` as CSV,
    atomically (a reader never sees half a file)."""
    clusters = clusters.reshape(-1).cpu()
    if clusters.shape[0] != len(data):
        raise ValueError(f"{path}: {clusters.shape[0]} cluster ids for {len(data)} images")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["index", "cluster", "label"] + (["file"] if data.files is not None else [])
    writer.writerow(header)
    columns = [range(len(data)), clusters.tolist(), data.labels.tolist()]
    if data.files is not None:
        columns.append(data.files)
    writer.writerows(zip(*columns))
    write_text_atomic(path, buffer.getvalue())


def cluster_size_stats(clusters: torch.Tensor, num_clusters: int) -> dict[str, float]:
    """How the images spread over the K clusters, from `clusters` (N,) int64 ids in [0, K): the
    label-free signs of a collapse (a head that puts everything in a few clusters, k-means with a
    giant cluster): `empty_clusters` (count), `largest_cluster_fraction` and
    `smallest_cluster_fraction` (of the N images; the smallest is 0 when a cluster is empty)."""
    if clusters.dim() != 1 or clusters.numel() == 0:
        raise ValueError(f"cluster ids: expected a non-empty (N,) tensor, got shape {tuple(clusters.shape)}")
    k = max(num_clusters, int(clusters.max()) + 1)
    counts = torch.bincount(clusters.long().cpu(), minlength=k)
    n = clusters.numel()
    return {"empty_clusters": int((counts == 0).sum()), "largest_cluster_fraction": float(counts.max()) / n,
            "smallest_cluster_fraction": float(counts.min()) / n}


def format_cluster_sizes(sizes: dict[str, float]) -> str:
    """`cluster_size_stats` for a log line: "largest cluster 12.3%, smallest 4.5%, 0 empty"."""
    return (f"largest cluster {100 * sizes['largest_cluster_fraction']:.1f}%, smallest "
            f"{100 * sizes['smallest_cluster_fraction']:.1f}%, {sizes['empty_clusters']} empty")


def write_features(path: Path, features: torch.Tensor, data: ImageData, kind: str) -> None:
    """Write `features` (N, D), those of each image of `data` (N images), to `path` as `.npz` with
    `features` (float32), `labels` (int64, -1 where unknown), `kind` (which features) and, for
    datasets read from files, `files`; atomically (a reader never sees half a file)."""
    features = features.detach().float().cpu()
    if features.dim() != 2 or features.shape[0] != len(data):
        raise ValueError(f"{path}: features of shape {tuple(features.shape)} for {len(data)} images")
    arrays = {"features": features.numpy(), "labels": data.labels.cpu().numpy().astype(np.int64),
              "kind": np.array(kind)}
    if data.files is not None:
        arrays["files"] = np.array(data.files)
    # to a file object: np.savez would append ".npz" to a name
    write_file_atomic(path, lambda f: np.savez(f, **arrays), binary=True)


def class_matching(clusters: torch.Tensor, data: ImageData, num_clusters: int) -> dict | None:
    """How the clusters map onto the classes, over the images of `data` that have a label, from
    `clusters` (N,) int64 ids in [0, K), K = `num_clusters` (or the largest id + 1):
    `class_names` (C,); `confusion`, (C, K) image counts, row = class, column = cluster;
    `cluster_class` (K,), each cluster's class under the best one-to-one matching, the one ACC scores
    (Hungarian), -1 for a cluster left unmatched (K > C); `class_accuracy` (C,), the fraction of each
    class's images in its matched cluster (0 for a class left unmatched, K < C; None for a class
    with no images). None when no image has a label."""
    clusters = clusters.reshape(-1).long().cpu()
    if clusters.shape[0] != len(data):
        raise ValueError(f"class matching: {clusters.shape[0]} cluster ids for {len(data)} images")
    known = data.labels >= 0
    if not known.any():
        return None
    k, c = max(num_clusters, int(clusters.max()) + 1), data.num_classes
    confusion = torch.bincount(data.labels[known] * k + clusters[known], minlength=c * k).reshape(c, k).numpy()
    sizes = confusion.sum(1)
    present = np.flatnonzero(sizes > 0)  # a class without images takes no cluster from one that has some
    cluster_class = [-1] * k
    class_accuracy: list[float | None] = [0.0 if size else None for size in sizes.tolist()]
    for row, cluster in zip(*linear_sum_assignment(confusion[present], maximize=True)):
        cls = int(present[row])
        cluster_class[int(cluster)] = cls
        class_accuracy[cls] = float(confusion[cls, cluster]) / float(sizes[cls])
    return {"class_names": list(data.class_names), "confusion": confusion.tolist(), "cluster_class": cluster_class,
            "class_accuracy": class_accuracy}
