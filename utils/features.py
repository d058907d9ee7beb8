"""Whole-dataset passes: features of every image in dataset order, and k-means on them."""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from utils import distributed as du
from utils.stop import StopRequested

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], data, *, batch_size: int,
                     device: torch.device, amp_dtype: torch.dtype | None = None,
                     num_workers: int = 0, normalize: bool = True,
                     should_stop: Callable[[], bool] | None = None, shuffle_seed: int | None = None) -> torch.Tensor:
    """Features (N, D) of every image of `data`, in dataset order, identical on every rank.

    Each rank runs `feature_fn` on its contiguous shard (deterministic test-time transform, normalised
    by the dataset statistics unless `normalize` is false, as `augment.normalize`); the shards are
    all-gathered into exactly N rows (no DistributedSampler padding duplicates).
    With `should_stop`, every rank asks it before each batch and raises `StopRequested` at the first
    batch where it is true on any rank (a collective check: all ranks stop at the same batch).
    With `shuffle_seed`, the pass visits the images in a random order fixed by the seed, in batches of
    near-equal size (none smaller than batch_size / 2 unless the shard is), and the rows come back in
    dataset order: for networks whose batch norm always normalises with the batch it sees (DCCM), so
    that no batch holds one class of a class-sorted dataset, and none is a lone image.
    """
    from data.loaders import iterate_shard, shard_bounds

    world_size, rank = du.get_world_size(), du.get_rank()
    order = None
    shard, shard_rank, shard_world = data, rank, world_size   # what this rank's pass iterates over
    if shuffle_seed is not None:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(shuffle_seed))
        # only this rank's rows of the shuffled order are gathered (a copy of N / world_size images)
        first, last = shard_bounds(len(data), rank, world_size)
        shard, shard_rank, shard_world = data.subset(order[first:last]), 0, 1

    def shard_batches(of_rank: int) -> tuple[int, int]:
        """(batch size, number of batches) of a rank's shard."""
        first, last = shard_bounds(len(data), of_rank, world_size)
        size = last - first
        rank_batch = batch_size
        if order is not None and size:   # ceil(size / batch_size) batches of near-equal size
            rank_batch = -(-size // -(-size // batch_size))
        return rank_batch, -(-size // rank_batch)

    # The checks are collectives, so every rank makes the same number: one per batch of the shard
    # with the fewest batches; the other ranks' few extra batches go unchecked.
    checked_batches = 0 if should_stop is None else min(shard_batches(r)[1] for r in range(world_size))
    chunks = []
    rank_batch = shard_batches(rank)[0]
    for batch, (images, _) in enumerate(iterate_shard(shard, batch_size=rank_batch, device=device,
                                                      rank=shard_rank, world_size=shard_world,
                                                      num_workers=num_workers, normalize=normalize)):
        if batch < checked_batches and du.any_rank([should_stop()], device)[0]:
            raise StopRequested(f"stop requested at batch {batch} of the feature pass")
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            chunks.append(feature_fn(images).float())
    if chunks:
        local = torch.cat(chunks)
    else:  # this rank's shard is empty (N < world size); its width comes from a probe
        probe = next(iter(iterate_shard(data, batch_size=1, device=device, rank=0, world_size=1,
                                        normalize=normalize)))[0]
        local = feature_fn(probe).float()[:0]
    features = du.all_gather_rows(local, len(data))
    if order is None:
        return features
    in_dataset_order = torch.empty_like(features)
    in_dataset_order[order.to(features.device)] = features
    return in_dataset_order


def cluster_features(features: torch.Tensor, *, num_clusters: int, metric: str, n_init: int, max_iter: int,
                     tol: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means on replicated features (N, D) -> (labels (N,), centroids (K, D)), identical on all ranks.

    Every rank holds the same features, so the `n_init` restarts are split over the ranks
    (torch_clustering's "replicated" mode: the best restart is broadcast). Rank 0's labels and
    centroids are broadcast once more so that floating-point differences between devices can never
    give ranks different pseudo-labels.
    """
    from torch_clustering import KMeans

    start = time.perf_counter()
    result = KMeans(num_clusters, metric=metric, init="k-means++", n_init=n_init, max_iter=max_iter,
                    tol=tol, seed=seed,
                    distributed="replicated" if du.get_world_size() > 1 else False).fit(features)
    labels = result.labels.to(features.device).contiguous()
    centroids = result.centroids.to(features.device, torch.float32).contiguous()
    du.broadcast_tensor(labels, src=0)
    du.broadcast_tensor(centroids, src=0)
    log.info("k-means: N=%d D=%d K=%d in %.2fs (%d iterations, inertia %.4g)", features.shape[0],
             features.shape[1], num_clusters, time.perf_counter() - start, result.n_iter, result.inertia)
    return labels, centroids


def assign_to_centroids(features: torch.Tensor, centroids: torch.Tensor, *, metric: str) -> torch.Tensor:
    """(N, D) features -> (N,) int64 index of the nearest of `centroids` (K, D) under `metric` (cosine:
    the largest cosine similarity), computed as the k-means that fitted them labels its own points."""
    from torch_clustering import KMeans

    if metric == "cosine":  # spherical k-means' centroids are unit already; any others are made so
        centroids = torch.nn.functional.normalize(centroids.float(), dim=1)
    model = KMeans(centroids.shape[0], metric=metric)
    model.centroids = centroids.to(features.device)  # a fitted model: predict() needs only its centroids
    return model.predict(features)
