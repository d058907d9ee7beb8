"""MoCo's queue under torchrun: every rank enqueues its keys, every rank must hold all of them in rank order.

Each rank runs one training step (shuffling BN on the key encoder across ranks) on its own images and
the after-step enqueue, then an explicit enqueue of rank-specific keys; each rank saves its own keys
and its resulting queue and pointer to OUT_PREFIX.rank{r}.pt.
Usage: moco_queue.py OUT_PREFIX
"""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from models import DataInfo, Progress, build_method
from models.moco import MoCoConfig
from utils import distributed as du

ROWS_PER_RANK, DIM, QUEUE = 3, 8, 16


def main(prefix: str) -> None:
    info = du.init_distributed("cpu", threads_per_rank=1)
    torch.manual_seed(0)
    cfg = MoCoConfig(projector_hidden_dim=16, feature_dim=DIM, queue_size=QUEUE, momentum=0.9, temperature=0.2,
                     symmetric=False, shuffling_bn=True)
    method = build_method(cfg, backbone="small_cnn", norm="batch",
                          data=DataInfo(in_channels=1, image_size=12, num_classes=2, num_samples=8, num_clusters=2))
    gen = torch.Generator().manual_seed(100 + info.rank)  # different images on each rank
    views = [torch.rand(ROWS_PER_RANK, 1, 12, 12, generator=gen) for _ in range(2)]
    model = DistributedDataParallel(method) if du.is_dist() else method
    progress = Progress(epoch=0, global_step=0, steps_per_epoch=1, total_steps=1)
    model(views, torch.arange(ROWS_PER_RANK), progress)["loss"].backward()
    step_keys = method._pending_keys.clone()
    method.after_optimizer_step(progress)
    queue_after_step, ptr_after_step = method.queue.clone(), int(method.queue_ptr)
    explicit_keys = torch.full((ROWS_PER_RANK, DIM), float(info.rank + 1)) + torch.arange(ROWS_PER_RANK)[:, None]
    method.enqueue(explicit_keys)
    torch.save({"step_keys": step_keys, "queue_after_step": queue_after_step, "ptr_after_step": ptr_after_step,
                "explicit_keys": explicit_keys, "queue": method.queue.clone(), "ptr": int(method.queue_ptr)},
               f"{prefix}.rank{info.rank}.pt")
    du.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
    du.exit_process(0)  # not through finalization: see exit_process
