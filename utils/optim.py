"""Optimizer from a method's parameter groups, and the per-iteration learning-rate schedule."""
from __future__ import annotations

import math

import torch

from utils.config import OPTIMIZERS   # what build_optimizer's `name` may be (config validation reads it too)


def build_optimizer(groups: list[dict], *, name: str, lr: float, weight_decay: float, momentum: float,
                    betas: tuple[float, float]) -> torch.optim.Optimizer:
    """groups: [{"params": [...], "lr_scale": float, optional "weight_decay", optional "fixed_lr"}] from
    Method.parameter_groups(); a `fixed_lr` group keeps lr * lr_scale, outside warm-up and cosine."""
    param_groups = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        param_groups.append({"params": params, "lr": lr * group.get("lr_scale", 1.0),
                             "lr_scale": group.get("lr_scale", 1.0), "fixed_lr": bool(group.get("fixed_lr", False)),
                             "weight_decay": group.get("weight_decay", weight_decay)})
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "rmsprop":  # DCCM: squared-gradient decay 0.9, no momentum
        return torch.optim.RMSprop(param_groups, lr=lr, alpha=0.9, weight_decay=weight_decay)
    raise ValueError(f"optim.name: unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


LR_SCHEDULES = ("cosine", "constant", "step")


class LRSchedule:
    """Linear warm-up from 0 over `warmup_steps`, then cosine from `base_lr` to `min_lr`, constant, or
    step (multiplied by `step_factor` every `step_every` steps after the warm-up: DEC's pretraining).

    Set per iteration; each optimizer group gets lr * its `lr_scale`, except groups marked `fixed_lr`
    (SimSiam's predictor), which keep base_lr * lr_scale throughout.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, base_lr: float, total_steps: int, warmup_steps: int,
                 schedule: str = "cosine", min_lr: float = 0.0, step_every: int = 0, step_factor: float = 0.1):
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
        if schedule == "step" and step_every < 1:
            raise ValueError(f"the step lr schedule needs step_every >= 1 iteration, got {step_every}")
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.min_lr = min_lr
        self.step_every = step_every
        self.step_factor = step_factor
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.base_lr
        if self.schedule == "step":
            return self.base_lr * self.step_factor ** ((step - self.warmup_steps) // self.step_every)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, progress)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self) -> float:
        """Set the lr of every group for the current step; returns the base lr."""
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = (self.base_lr if group.get("fixed_lr") else lr) * group.get("lr_scale", 1.0)
        return lr

    def advance(self) -> None:
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
