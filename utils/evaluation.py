"""Label-based evaluation of frozen features: the weighted kNN monitor and the linear probe.

Both are plain functions of feature tensors (no config, no model), so the trainer, the evaluation-only
runs of `main.py --eval` and the tests call them the same way. The features are whole-dataset features
that every rank already holds (`utils.features.extract_features`); both functions are deterministic,
so every rank computes the same number. `nearest_neighbours` is the same exact cosine search without
labels, which SCAN mines its neighbours with.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F


def _cosine_top_k(memory: torch.Tensor, query_features: torch.Tensor, k: int, *, leave_one_out: bool,
                  chunk_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For `chunk_size` queries at a time: (similarities (chunk, k), memory rows (chunk, k)) of the k most
    cosine-similar rows of `memory` (N, D), already L2-normalised; leave_one_out: query i is memory row i
    and never its own neighbour. O(chunk_size x N) memory."""
    device = memory.device
    for start in range(0, query_features.shape[0], chunk_size):
        queries = F.normalize(query_features[start:start + chunk_size].to(device).float(), dim=1)
        similarity = queries @ memory.T                                   # (chunk, N)
        if leave_one_out:
            rows = torch.arange(queries.shape[0], device=device)
            similarity[rows, rows + start] = float("-inf")
        yield similarity.topk(k, dim=1)


@torch.no_grad()
def nearest_neighbours(features: torch.Tensor, k: int, *, chunk_size: int = 1024) -> torch.Tensor:
    """(N, k) int64: each row's k most cosine-similar other rows of features (N, D), most similar first
    (exact search, SCAN's and NNM's mining). Runs on the features' device in chunks of rows."""
    if features.dim() != 2:
        raise ValueError(f"nearest_neighbours: expected features (N, D), got {tuple(features.shape)}")
    if not 1 <= k < features.shape[0] or chunk_size < 1:
        raise ValueError(f"nearest_neighbours: need 1 <= k < N = {features.shape[0]} and chunk_size >= 1, "
                         f"got k={k}, chunk_size={chunk_size}")
    memory = F.normalize(features.float(), dim=1)
    chunks = [top_idx for _, top_idx in _cosine_top_k(memory, features, k, leave_one_out=True, chunk_size=chunk_size)]
    return torch.cat(chunks)


@torch.no_grad()
def neighbour_precision(neighbours: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of (image, listed neighbour) pairs that share a class: neighbours (N, k) rows, labels
    (N,) with -1 for unknown; pairs where either label is unknown are left out (SCAN's mining check).
    NaN when no pair has both labels."""
    labels = labels.to(neighbours.device)
    own = labels.unsqueeze(1).expand_as(neighbours)
    theirs = labels[neighbours]
    known = (own >= 0) & (theirs >= 0)
    count = int(known.sum())
    return int(((own == theirs) & known).sum()) / count if count else float("nan")


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor, *,
                k: int = 200, temperature: float = 0.1, num_classes: int, chunk_size: int = 1024,
                leave_one_out: bool = False) -> torch.Tensor:
    """Weighted kNN class predictions (M,) for queries (M, D) against a memory (N, D) with labels (N,).

    Cosine similarity (both sides L2-normalised); each of the k nearest memory rows votes for its
    label with weight exp(sim / temperature), as in the InstDisc / MoCo kNN monitor. Runs on the
    features' device, `chunk_size` queries at a time, so memory is O(chunk_size x N), not O(M x N).
    leave_one_out: the queries are the memory rows themselves (M == N, same order); each query's own
    row is excluded from its neighbours (the transductive protocol where train and eval set coincide).
    """
    if train_features.dim() != 2 or query_features.dim() != 2 or train_features.shape[1] != query_features.shape[1]:
        raise ValueError(f"knn: expected features (N, D) and (M, D), got {tuple(train_features.shape)} and "
                         f"{tuple(query_features.shape)}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"knn: {train_features.shape[0]} memory rows but labels of shape {tuple(train_labels.shape)}")
    if leave_one_out and query_features.shape[0] != train_features.shape[0]:
        raise ValueError("knn: leave_one_out needs the queries to be the memory rows (M == N)")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"knn: need k >= 1, temperature > 0, chunk_size >= 1 (got {k}, {temperature}, {chunk_size})")
    device = train_features.device
    memory = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(device).long()
    k = min(k, memory.shape[0] - int(leave_one_out))
    if k < 1:
        raise ValueError("knn: the memory has no rows to vote")
    predictions = []
    for top_sim, top_idx in _cosine_top_k(memory, query_features, k, leave_one_out=leave_one_out,
                                          chunk_size=chunk_size):
        votes = torch.zeros(top_sim.shape[0], num_classes, device=device)
        votes.scatter_add_(1, labels[top_idx], (top_sim / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    if not predictions:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(predictions)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 query_labels: torch.Tensor, *, k: int = 200, temperature: float = 0.1, num_classes: int,
                 chunk_size: int = 1024, leave_one_out: bool = False) -> float:
    """Top-1 accuracy of `knn_predict` on queries with labels (M,); see `knn_predict` for the rest."""
    if query_labels.shape != (query_features.shape[0],):
        raise ValueError(f"knn: {query_features.shape[0]} queries but labels of shape {tuple(query_labels.shape)}")
    if query_labels.numel() == 0:
        raise ValueError("knn: no labelled queries to score")
    predictions = knn_predict(train_features, train_labels, query_features, k=k, temperature=temperature,
                              num_classes=num_classes, chunk_size=chunk_size, leave_one_out=leave_one_out)
    return float((predictions.cpu() == query_labels.cpu().long()).float().mean())


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, epochs: int = 100, lr: float = 0.01, weight_decay: float = 0.0,
                 batch_size: int = 1024, seed: int = 0, num_classes: int | None = None,
                 augmented_train: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> float:
    """Top-1 accuracy on the test rows of a linear classifier trained on frozen features.

    train_features (N, D) with labels (N,), test_features (M, D) with labels (M,). Features are
    standardised with the training rows' mean and std; the classifier (D -> num_classes, default
    max label + 1) is trained with Adam on cross-entropy for `epochs` passes of shuffled mini-batches
    of `batch_size` rows (0 = full batch). Deterministic for a seed; runs on the features' device.
    Seconds for 10k x 512 on a CPU.

    augmented_train: when given, epoch e trains on the rows `augmented_train(e)` returns instead,
    (features (N', D), labels (N',)): the train images re-extracted under augmentation each epoch.
    They are standardised with the clean train features' statistics, which still set the scale.
    """
    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"linear probe: expected features (N, D) and (M, D), got {tuple(train_features.shape)} "
                         f"and {tuple(test_features.shape)}")
    if train_labels.shape != (train_features.shape[0],) or test_labels.shape != (test_features.shape[0],):
        raise ValueError("linear probe: one label per feature row expected")
    if train_labels.numel() == 0 or test_labels.numel() == 0:
        raise ValueError("linear probe: needs labelled training and test rows")
    if epochs < 1 or lr <= 0 or batch_size < 0:
        raise ValueError(f"linear probe: need epochs >= 1, lr > 0, batch_size >= 0 (got {epochs}, {lr}, {batch_size})")
    device = train_features.device
    x_train = train_features.detach().float()
    mean, std = x_train.mean(0, keepdim=True), x_train.std(0, keepdim=True).clamp_min(1e-6)
    x_train = (x_train - mean) / std
    x_test = (test_features.detach().to(device).float() - mean) / std
    y_train = train_labels.to(device).long()
    classes = num_classes or int(max(int(train_labels.max()), int(test_labels.max()))) + 1

    generator = torch.Generator().manual_seed(seed)
    classifier = torch.nn.Linear(x_train.shape[1], classes)
    with torch.no_grad():  # seeded initialisation, independent of the global RNG
        bound = 1.0 / x_train.shape[1] ** 0.5
        classifier.weight.copy_(torch.empty_like(classifier.weight).uniform_(-bound, bound, generator=generator))
        classifier.bias.zero_()
    classifier = classifier.to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    with torch.enable_grad():
        for epoch in range(epochs):
            x_epoch, y_epoch = x_train, y_train
            if augmented_train is not None:
                x_epoch, y_epoch = augmented_train(epoch)
                x_epoch = (x_epoch.detach().to(device).float() - mean) / std
                y_epoch = y_epoch.to(device).long()
            n = x_epoch.shape[0]
            step = batch_size or n
            order = torch.randperm(n, generator=generator).to(device)
            for start in range(0, n, step):
                rows = order[start:start + step]
                loss = F.cross_entropy(classifier(x_epoch[rows]), y_epoch[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            schedule.step()
    with torch.no_grad():
        predictions = classifier(x_test).argmax(dim=1)
    return float((predictions.cpu() == test_labels.cpu().long()).float().mean())
