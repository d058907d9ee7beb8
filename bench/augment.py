"""Rough throughput of the training views: BatchAugment (batched, on the device) against the
per-sample torchvision.transforms.v2 pipeline that the workers loader runs, both in this process.

    python bench/augment.py                        # MNIST 28 px and CIFAR 32 px on the CPU
    python bench/augment.py --device cuda --batch 512
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.augment import build_batch_augments, build_sample_transform  # noqa: E402
from data.config import AugmentConfig  # noqa: E402
from utils import distributed as du  # noqa: E402

# The shipped demo's digit views and the SimCLR-style CIFAR views of the ProPos paper configs.
CASES = {
    "mnist28": (1, 28, AugmentConfig(crop_scale=[0.6, 1.0], crop_ratio=[0.8, 1.25], hflip_p=0.0, saturation=0.0,
                                     hue=0.0, grayscale_p=0.0, affine_degrees=15, affine_translate=0.1,
                                     affine_shear=15, elastic_p=0.8, elastic_alpha=30.0)),
    "cifar32": (3, 32, AugmentConfig()),
    "cifar32_byol": (3, 32, AugmentConfig(blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2])),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batched_rate(channels: int, size: int, cfg: AugmentConfig, *, batch: int, device: torch.device,
                 seconds: float) -> float:
    """Augmented images per second (each image of the batch in two views counts once)."""
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, device=device)
    augments = build_batch_augments(cfg, num_views=2, image_size=size, channels=channels, mean=[0.5] * channels,
                                    std=[0.25] * channels)
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(3):
        [augment(images, generator) for augment in augments]
    _sync(device)
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        [augment(images, generator) for augment in augments]
        done += 1
        _sync(device)
    return done * batch / (time.perf_counter() - start)


def per_sample_rate(channels: int, size: int, cfg: AugmentConfig, *, seconds: float) -> float:
    images = torch.randint(0, 256, (64, channels, size, size), dtype=torch.uint8)
    transforms = [build_sample_transform(cfg, image_size=size, channels=channels, mean=[0.5] * channels,
                                         std=[0.25] * channels, view=v) for v in (0, 1)]
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for image in images:
            [t(image) for t in transforms]
        done += len(images)
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per case")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    args = parser.parse_args(argv)
    try:
        device = du.check_device(args.device, "--device")
    except (ValueError, du.DeviceUnavailableError) as exc:
        raise SystemExit(str(exc)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, {torch.get_num_threads()} CPU threads, batch {args.batch}, two views per image")
    for name, (channels, size, cfg) in CASES.items():
        rate = batched_rate(channels, size, cfg, batch=args.batch, device=device, seconds=args.seconds)
        baseline = per_sample_rate(channels, size, cfg, seconds=args.seconds)
        print(f"{name:>13}: BatchAugment {rate:9.0f} images/s   per-sample v2 (one process) {baseline:7.0f} images/s")


if __name__ == "__main__":
    main()
