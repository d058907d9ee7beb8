"""Train a clustering method from a YAML config.

    python main.py config/mnist_cnn_propos.yml                     # one process (CPU or one GPU)
    python main.py config/mnist_cnn_propos.yml train.epochs=2      # dotted overrides, validated like the YAML
    torchrun --nproc_per_node=4 main.py config/cifar10_r18_propos.yml
    python main.py CONFIG --resume auto                            # continue the newest checkpoint of the run
    srun python main.py CONFIG                                     # SLURM, one task per GPU (see scripts/)
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("main")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file (config/*.yml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=2")
    parser.add_argument("--resume", default="", help="checkpoint path, or 'auto' for the newest in the run directory")
    return parser.parse_args(argv)


def seed_everything(seed: int, rank: int) -> None:
    # Different streams per rank (latent noise, augmentations); DDP broadcasts rank 0's initial weights.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def prepare_run_dir(cfg, resume: str) -> Path:
    """The run directory; refuse to write over an earlier run's checkpoints unless resuming."""
    from utils.checkpoint import find_latest_checkpoint

    run_dir = Path(cfg.run.output_dir) / (cfg.run.name or Path(cfg.source).stem)
    if not resume and find_latest_checkpoint(run_dir) is not None:
        raise SystemExit(f"error: run directory {run_dir} already holds checkpoints; pass --resume auto to "
                         f"continue that run, or choose another run.name=...")
    return run_dir


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    from utils.config import ConfigError, load_config, save_resolved_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None

    from data.datasets import build_eval_dataset, build_train_dataset
    from models import DataInfo, build_method
    from utils import distributed as du
    from utils.checkpoint import find_latest_checkpoint
    from utils.logger import MetricWriter, setup_logging
    from utils.trainer import Trainer

    dist_info = du.init_distributed(cfg.run.device, cfg.run.threads_per_rank)
    run_dir = prepare_run_dir(cfg, args.resume)
    if dist_info.is_main:  # rank 0 only: create the run directory and write the resolved config
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, run_dir / "config.yml")
    du.barrier()
    setup_logging(dist_info.rank, run_dir / "train.log" if dist_info.is_main else None)
    seed_everything(cfg.run.seed, dist_info.rank)
    log.info("config %s -> run directory %s (%d process(es), device %s, %d threads each)", cfg.source, run_dir,
             dist_info.world_size, dist_info.device, torch.get_num_threads())

    train_data = build_train_dataset(cfg.data)
    same_rows = cfg.data.resolved_eval_split == cfg.data.split and not cfg.data.stl10_unlabeled
    eval_data = train_data if same_rows else build_eval_dataset(cfg.data)
    num_clusters = cfg.cluster.num_clusters or train_data.num_classes
    method = build_method(cfg.method, backbone=cfg.model.backbone, norm=cfg.model.norm,
                          data=DataInfo(in_channels=train_data.channels, image_size=train_data.image_size,
                                        num_classes=train_data.num_classes, num_samples=len(train_data),
                                        num_clusters=num_clusters))
    writer = None
    if dist_info.is_main:  # rank 0 only: metrics file and wandb
        writer = MetricWriter(run_dir, use_wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                              wandb_entity=cfg.logging.wandb_entity, run_name=run_dir.name, config=cfg.to_dict())
    trainer = Trainer(cfg, method, train_data, eval_data, dist_info=dist_info, run_dir=run_dir, writer=writer)
    if args.resume:
        path = find_latest_checkpoint(run_dir) if args.resume == "auto" else Path(args.resume)
        if path is not None:
            trainer.load(path)
        else:
            log.info("--resume auto: no checkpoint in %s yet, starting fresh", run_dir)
    result = trainer.fit()
    if writer is not None:
        writer.close()
    metrics = result.metrics
    if dist_info.is_main and metrics:  # rank 0 only: the one-line summary a researcher greps for
        print(f"final ({result.epochs_done} epochs, {result.seconds:.0f}s): "
              f"NMI {metrics['nmi']:.4f}  ACC {metrics['acc']:.4f}  ARI {metrics['ari']:.4f}", flush=True)
    du.cleanup_distributed()
    return metrics


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
