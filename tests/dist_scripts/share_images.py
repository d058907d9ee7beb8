"""Build a run's datasets (main.build_datasets: every rank loads the in-memory images, and the ranks
of the node keep one copy); rank r saves OUT_DIR/rank{r}.pt: {"train"/"eval": the images, "sees": per
set, the ranks whose writes into its images this rank sees}.

Usage: share_images.py CONFIG OUT_DIR [key=value ...]
Environment: SHARED_MEMORY_DIR, in place of /dev/shm.
"""
import os
import sys
from pathlib import Path

import torch

import main as launcher
from utils import distributed as du
from utils.config import load_config


def main(config: str, out_dir: str, overrides: list[str]) -> None:
    info = du.init_distributed("cpu", threads_per_rank=1)
    du.SHARED_MEMORY_DIR = os.environ.get("SHARED_MEMORY_DIR", du.SHARED_MEMORY_DIR)
    datasets = launcher.build_datasets(load_config(config, overrides))
    result = {"train": datasets.train.images.clone(), "eval": datasets.eval.images.clone(), "sees": {}}
    for name, data in (("train", datasets.train), ("eval", datasets.eval)):
        # Rank r writes 200 + r into element r of the images (a black corner pixel of the first image).
        flat = data.images.view(-1)
        du.barrier()
        flat[info.rank] = 200 + info.rank
        du.barrier()
        result["sees"][name] = [r for r in range(info.world_size) if flat[r] == 200 + r]
    torch.save(result, Path(out_dir) / f"rank{info.rank}.pt")
    du.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
