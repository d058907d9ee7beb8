"""Images per second of a ProPos training step, fed two ways in one run:

* ``device``: the images stay on the training device as uint8 and every batch is augmented there
  by `data.augment.BatchAugment` (one random draw per image, whole-batch tensor ops);
* ``workers``: the same step fed by a DataLoader whose workers run the per-sample
  torchvision.transforms.v2 pipeline with the same augmentation settings (what image-folder
  datasets use, and what the reference code does for every dataset).

Both use the trainer's own step (forward of both views, target pass, PSA + PSL, backward,
optimizer, EMA), with the clustering terms on (pseudo-labels from one k-means first).

    python bench/train_step.py                                   # the demo: small CNN, MNIST digits, CPU
    python bench/train_step.py --config config/cifar10_r18_propos.yml data.root=../shared/data/cifar10_jpeg.npz \\
        --device cuda --steps 50                                 # on a GPU

Overrides after the config are the launcher's dotted keys. Prints one line per feed and the ratio.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import main as launcher  # noqa: E402
from utils import distributed as du  # noqa: E402
from utils.config import ConfigError, load_config  # noqa: E402
from utils.trainer import Trainer  # noqa: E402


def build_trainer(config: str, overrides: list[str], loader: str, run_dir: Path) -> Trainer:
    """The launcher's own method and Trainer for the config, fed by `loader`, pseudo-labels ready."""
    try:
        cfg = load_config(config, [*overrides, f"data.loader={loader}", "method.warmup_epochs=0",
                                   "logging.progress_bar=false"])
    except ConfigError as exc:  # a mistyped override: the launcher's one line, not a traceback
        raise SystemExit(f"error: {exc}") from None
    dist_info = launcher.start_distributed(cfg)
    torch.manual_seed(cfg.run.seed)
    trainer = launcher.build_trainer(cfg, dist_info, run_dir, None, launcher.build_datasets(cfg))
    if trainer.method.wants_pseudo_labels(0):
        trainer.update_pseudo_labels()
    return trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(trainer: Trainer, *, steps: int, warmup: int) -> float:
    """Training images per second (one image = its two views) over `steps` steps after `warmup`."""
    done, start, images, epoch = 0, None, 0, 0
    while done < warmup + steps:
        trainer.loader.set_epoch(epoch)
        for batch in trainer.loader:
            if done == warmup:
                sync(trainer.device)
                start, images = time.perf_counter(), 0
            trainer.train_step(batch.views, batch.indices, epoch)
            images += batch.indices.shape[0]
            done += 1
            if done == warmup + steps:
                break
        epoch += 1
    sync(trainer.device)
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO_ROOT / "config" / "mnist_cnn_propos.yml"))
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.batch_size_per_rank=128")
    p.add_argument("--device", default="cpu", help="run.device (cpu, cuda)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per feed")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (workers start, caches warm)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers of the workers feed")
    args = p.parse_intermixed_args(argv)  # overrides before, between or after the options
    logging.basicConfig(level=logging.WARNING)
    overrides = [*args.overrides, f"run.device={args.device}", f"data.num_workers={args.workers}"]
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for loader in ("device", "workers"):
            trainer = build_trainer(args.config, overrides, loader, Path(tmp))
            rates[loader] = images_per_second(trainer, steps=args.steps, warmup=args.warmup)
            cfg = trainer.cfg
            print(f"{loader:8s} feed: {rates[loader]:8.1f} images/s  ({cfg.method.name}, {cfg.model.backbone}, "
                  f"{cfg.data.name}, batch {cfg.train.batch_size_per_rank}, device {trainer.device}, "
                  f"torch threads {torch.get_num_threads()}"
                  + (f", {args.workers} workers" if loader == "workers" else "") + ")", flush=True)
            del trainer
    print(f"device feed / workers feed: {rates['device'] / rates['workers']:.2f}x")
    du.cleanup_distributed()


if __name__ == "__main__":
    main()
    du.exit_process(0)  # not through the interpreter's finalization, which can abort a gloo rank (see there)
