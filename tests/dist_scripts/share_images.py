"""Build a run's datasets (main.build_datasets: the node's first rank loads the in-memory images, and
the ranks of the node share its copy); rank r saves OUT_DIR/rank{r}.pt: {"train"/"eval": the images,
"sees": per set, the ranks whose writes into its images this rank sees, "loads": how many sets this
rank built itself, "read_into": per set, whether its images are a tensor this rank's own build read them
into}, or {"error": the message, "loads"} when build_datasets stopped the run.

Usage: share_images.py CONFIG OUT_DIR [key=value ...]
Environment: SHARED_MEMORY_DIR, in place of /dev/shm; NODES, a node name per rank ("a,a,b": a node of
two ranks and a node of one), to act several nodes on one machine; PRIVATE_ALLOCATION, ranks ("1,2") whose
builds read into a tensor of their own rather than the one they are given; AVAILABLE_MEMORY, the bytes of
memory the ranks take to be available; UNREADABLE=1, np.load refuses every file as a permission error would.
"""
import os
import sys
from pathlib import Path

import numpy as np
import torch

import main as launcher
from data import datasets
from utils import distributed as du
from utils import trainer
from utils.config import load_config


def main(config: str, out_dir: str, overrides: list[str]) -> None:
    info = du.init_distributed("cpu", threads_per_rank=1)
    du.SHARED_MEMORY_DIR = os.environ.get("SHARED_MEMORY_DIR", du.SHARED_MEMORY_DIR)
    if os.environ.get("NODES"):
        du.node_name = lambda: os.environ["NODES"].split(",")[info.rank]
    if os.environ.get("UNREADABLE"):
        def refused(path, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        np.load = refused
    if os.environ.get("AVAILABLE_MEMORY"):
        trainer.available_memory_bytes = lambda: int(os.environ["AVAILABLE_MEMORY"])
    loads, allocated = [], []
    build_dataset = datasets.build_dataset
    private = str(info.rank) in os.environ.get("PRIVATE_ALLOCATION", "").split(",")

    def counted(*args, **kwargs):
        loads.append(kwargs.get("split"))
        given = datasets.empty_images if private else kwargs["allocate"]

        def allocate(shape):
            allocated.append(given(shape))
            return allocated[-1]

        return build_dataset(*args, **{**kwargs, "allocate": allocate})

    datasets.build_dataset = counted
    try:
        built = launcher.build_datasets(load_config(config, overrides))
    except SystemExit as exc:
        torch.save({"error": str(exc.code), "loads": loads}, Path(out_dir) / f"rank{info.rank}.pt")
        du.cleanup_distributed()
        return
    result = {"train": built.train.images.clone(), "eval": built.eval.images.clone(), "sees": {}, "loads": loads,
              "read_into": {name: any(data.images.data_ptr() == tensor.data_ptr() for tensor in allocated)
                            for name, data in (("train", built.train), ("eval", built.eval))}}
    for name, data in (("train", built.train), ("eval", built.eval)):
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
    du.exit_process(0)  # not through finalization: see exit_process
