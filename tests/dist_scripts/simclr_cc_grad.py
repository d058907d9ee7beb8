"""One SimCLR step, one CC step, one step of SCAN's clustering stage (3 heads), one of its
self-labelling stage, one of NNM's clustering stage (bank in use) and one DCCM step on a fixed global
batch; rank 0 saves every parameter's gradient.

Run as one process (the whole batch) or under torchrun (each rank its contiguous half); with
gathers that sum gradients back, the DDP-averaged gradients must equal the one-process ones.
norm="none": BatchNorm would normalise over each rank's half and so differ by design.
Usage: simclr_cc_grad.py OUT.pt
"""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from models import DataInfo, Progress, build_method
from models.cc import CCConfig
from models.dccm import DCCMConfig
from models.nnm import NNMConfig
from models.scan import SCANConfig
from models.simclr import SimCLRConfig
from utils import distributed as du

GLOBAL_BATCH, NUM_CLUSTERS = 8, 3


def one_step(cfg, info, views, stage: str = "", buffers: dict | None = None, backbone: str = "small_cnn",
             dtype: torch.dtype = torch.float32) -> dict:
    torch.manual_seed(0)  # identical initial weights on every rank (DDP would broadcast them anyway)
    method = build_method(cfg, backbone=backbone, norm="none",
                          data=DataInfo(in_channels=1, image_size=views[0].shape[-1], num_classes=NUM_CLUSTERS,
                                        num_samples=GLOBAL_BATCH, num_clusters=NUM_CLUSTERS)).to(dtype)
    views = [x.to(dtype) for x in views]
    if stage:
        method.enter_stage(stage)
    for name, value in (buffers or {}).items():   # method state set as a refresh or an E-step would
        getattr(method, name).copy_(value)
    rows = GLOBAL_BATCH // info.world_size
    mine = slice(info.rank * rows, (info.rank + 1) * rows)
    model = DistributedDataParallel(method) if du.is_dist() else method
    terms = model([x[mine] for x in views], torch.arange(GLOBAL_BATCH)[mine],
                  Progress(epoch=0, global_step=1, steps_per_epoch=1, total_steps=2, stage=stage or "train",
                           stage_step=1))
    terms["loss"].backward()
    return {"terms": {k: v.item() for k, v in terms.items()},
            "grads": {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}}


def main(out_path: str) -> None:
    info = du.init_distributed("cpu", threads_per_rank=1)
    gen = torch.Generator().manual_seed(1)
    x1 = torch.rand(GLOBAL_BATCH, 1, 12, 12, generator=gen)
    x2 = torch.rand(GLOBAL_BATCH, 1, 12, 12, generator=gen)
    x3 = torch.rand(GLOBAL_BATCH, 1, 12, 12, generator=gen)
    # a bank for 3 heads (NNM), the same on every rank
    bank = torch.softmax(torch.randn(3, GLOBAL_BATCH, NUM_CLUSTERS, generator=gen), dim=2)
    x24 = torch.rand(GLOBAL_BATCH, 1, 24, 24, generator=gen)
    clean = torch.softmax(4 * torch.randn(GLOBAL_BATCH, NUM_CLUSTERS, generator=gen), dim=1)
    results = {
        "simclr": one_step(SimCLRConfig(projector_hidden_dim=32, feature_dim=16, temperature=0.5), info, [x1, x2]),
        "cc": one_step(CCConfig(instance_hidden_dim=32, feature_dim=16, cluster_hidden_dim=32), info, [x1, x2]),
        "scan": one_step(SCANConfig(projector_hidden_dim=32, feature_dim=16, num_heads=3, num_neighbours=2),
                         info, [x1, x2], stage="scan"),
        # a low threshold makes rows confident, so the class weights count the global batch
        "selflabel": one_step(SCANConfig(projector_hidden_dim=32, feature_dim=16, selflabel_epochs=1,
                                         selflabel_threshold=0.34), info, [x1, x2], stage="selflabel"),
        "nnm": one_step(NNMConfig(projector_hidden_dim=32, feature_dim=16, num_neighbours=2), info, [x1, x2, x3],
                        stage="scan", buffers={"bank": bank, "bank_ready": torch.tensor(True)}),
        # DCCM's graph and label terms over the global batch (its critic pairs are per rank by design);
        # in float64, as its Kaiming-initialised CNN without batch norm sums large activations
        "dccm": one_step(DCCMConfig(critic_hidden_dim=8, local_weight=0.0), info, [x24], backbone="dccm_cnn",
                         buffers={"clean_predictions": clean}, dtype=torch.float64),
    }
    if info.is_main:
        torch.save(results, out_path)
    du.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
    du.exit_process(0)  # not through finalization: see exit_process
