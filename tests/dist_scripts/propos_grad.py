"""One ProPos step on a fixed global batch; rank 0 saves every parameter's gradient.

Run as one process (the whole batch) or under torchrun (each rank its contiguous half); with
exact gathers the DDP-averaged gradients must equal the one-process ones.
Usage: propos_grad.py OUT.pt
"""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from models import DataInfo, Progress, build_method
from models.propos import ProPosConfig
from utils import distributed as du

GLOBAL_BATCH, NUM_SAMPLES, NUM_CLUSTERS = 8, 12, 3


def gradients(out_path: str) -> None:
    info = du.init_distributed("cpu", threads_per_rank=1)
    torch.manual_seed(0)  # identical initial weights on every rank (DDP would broadcast them anyway)
    cfg = ProPosConfig(projector_hidden_dim=32, feature_dim=16, predictor_hidden_dim=32, latent_std=0.0,
                       cluster_loss_weight=1.0, warmup_epochs=0, symmetric=True)
    method = build_method(cfg, backbone="small_cnn", norm="none",
                          data=DataInfo(in_channels=1, image_size=12, num_classes=3, num_samples=NUM_SAMPLES,
                                        num_clusters=NUM_CLUSTERS))
    gen = torch.Generator().manual_seed(1)
    x1 = torch.rand(GLOBAL_BATCH, 1, 12, 12, generator=gen)
    x2 = torch.rand(GLOBAL_BATCH, 1, 12, 12, generator=gen)
    indices = torch.randperm(NUM_SAMPLES, generator=gen)[:GLOBAL_BATCH]
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 2, 2])
    method.set_pseudo_labels(labels, torch.zeros(NUM_CLUSTERS, 16))
    rows = GLOBAL_BATCH // info.world_size
    mine = slice(info.rank * rows, (info.rank + 1) * rows)
    model = DistributedDataParallel(method) if du.is_dist() else method
    terms = model([x1[mine], x2[mine]], indices[mine], Progress(epoch=0, global_step=0, steps_per_epoch=1,
                                                                 total_steps=1))
    terms["loss"].backward()
    if info.is_main:
        torch.save({"grads": {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None},
                    "psl": terms["psl"].item()}, out_path)
    du.cleanup_distributed()


if __name__ == "__main__":
    gradients(sys.argv[1])
    du.exit_process(0)  # not through finalization: see exit_process
