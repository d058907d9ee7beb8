"""Thin wrapper over the default `torch.distributed` process group.

Every collective the clustering code needs goes through `Comm`, so one process and
`torchrun --nproc_per_node=N` share one code path: with `world_size == 1` the
collectives are no-ops and no process group is needed at all.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class Comm:
    """Collectives over the default process group (or none, for one process).

    Tensors passed to the collectives live on the device of the data being clustered,
    which is what NCCL (CUDA tensors) and gloo (CPU tensors) both accept.
    """

    def __init__(self, enabled: bool) -> None:
        if enabled:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "a distributed fit (KMeans or GaussianMixture with distributed set) needs "
                    "torch.distributed to be initialised (call torch.distributed.init_process_group "
                    "first, e.g. under torchrun)")
            self.world_size = dist.get_world_size()
            self.rank = dist.get_rank()
        else:
            self.world_size = 1
            self.rank = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce `t` in place with SUM and return it."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.active:
            dist.broadcast(t, src=src)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Gather a tensor of the same shape from every rank (rank order)."""
        if not self.active:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return out

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate, in rank order, 2-D tensors whose row counts differ between ranks.

        Rows are padded to the largest count for the collective and trimmed afterwards.
        """
        if not self.active:
            return t
        n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.int64)
        counts = [int(c.item()) for c in self.all_gather(n)]
        padded = t.new_zeros((max(counts), t.shape[1]))
        padded[: t.shape[0]] = t
        parts = self.all_gather(padded)
        return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)
