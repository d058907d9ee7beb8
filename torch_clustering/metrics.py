"""External clustering metrics: NMI, ACC (Hungarian matching) and ARI.

All three are computed from the contingency table of (true class, predicted cluster),
in float64 / exact integers on the CPU, and returned as python floats, so they can be
logged directly by the training loop.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def _to_labels(y, name: str) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    return y


def contingency_matrix(labels_true, labels_pred) -> np.ndarray:
    """(n_classes, n_clusters) int64 counts of points per (class, cluster) pair.

    Label values may be arbitrary (negative, non-contiguous); rows and columns follow the
    sorted unique values.
    """
    t = _to_labels(labels_true, "labels_true")
    p = _to_labels(labels_pred, "labels_pred")
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"labels_true and labels_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    if t.shape[0] == 0:
        raise ValueError("labels are empty")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((ti.max() + 1, pi.max() + 1), dtype=np.int64)
    np.add.at(table, (ti.ravel(), pi.ravel()), 1)
    return table


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def _nmi(table: np.ndarray) -> float:
    """Mutual information over the arithmetic mean of the two entropies (natural log)."""
    n = int(table.sum())
    rows, cols = table.sum(1), table.sum(0)
    if table.shape[0] == table.shape[1] == 1:
        return 1.0                      # neither labelling splits the data: identical
    nz = table > 0
    nij = table[nz].astype(np.float64)
    outer = np.outer(rows, cols)[nz].astype(np.float64)
    mi = float((nij / n * (np.log(nij) + np.log(n) - np.log(outer))).sum())
    if mi <= 0:
        return 0.0                      # also covers rounding just below zero
    denom = 0.5 * (_entropy(rows, n) + _entropy(cols, n))
    return float(mi / denom)


def _ari(table: np.ndarray) -> float:
    """Hubert & Arabie's adjusted Rand index, with exact integer pair counts."""
    n = int(table.sum())

    def pairs(v) -> int:
        return sum(int(a) * (int(a) - 1) // 2 for a in np.asarray(v).ravel())

    index = pairs(table)
    a, b, total = pairs(table.sum(1)), pairs(table.sum(0)), n * (n - 1) // 2
    if total == 0:
        return 1.0
    expected = a * b / total
    maximum = 0.5 * (a + b)
    if maximum == expected:             # both labellings trivial in the same way
        return 1.0
    return float((index - expected) / (maximum - expected))


def _acc(table: np.ndarray) -> float:
    """Best one-to-one matching of clusters to classes (Hungarian algorithm).

    With more clusters than classes (or fewer), the matching is rectangular: points of
    unmatched clusters (or classes) count as wrong.
    """
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def evaluate_clustering(labels_true, labels_pred) -> dict[str, float]:
    """NMI, ACC and ARI of a clustering against ground-truth classes.

    Args:
        labels_true: (N,) class labels, tensor (any device), array or list.
        labels_pred: (N,) cluster labels; the number of clusters may differ from the
            number of classes.
    Returns:
        {"nmi": float, "acc": float, "ari": float}.  NMI uses the arithmetic mean of the
        entropies (scikit-learn's default); ACC is the fraction of points correctly
        labelled under the best one-to-one cluster-to-class map.
    """
    table = contingency_matrix(labels_true, labels_pred)
    return {"nmi": _nmi(table), "acc": _acc(table), "ari": _ari(table)}
