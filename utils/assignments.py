"""The run's answer for every image: its cluster, written as CSV beside the run's checkpoints.

`clusters.csv` (after training) and `CHECKPOINT.clusters.csv` (`main.py --eval cluster`) hold one
row per image of the evaluation set, in dataset order: `index`, `cluster` (the method's read-out:
k-means of the evaluation features, or the head's argmax), `label` (-1 where the data have none,
e.g. an unlabeled image folder) and, for datasets read from files, `file`.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from data.datasets import ImageData
from utils.checkpoint import write_text_atomic


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
