"""The shared base of every method, and the registry that names them.

A method owns its modules (backbone, heads, EMA target, prototypes, queues) and implements a few
hooks; the trainer (utils/trainer.py) calls only these and never asks which method it runs:

- `training_step(views, indices, progress) -> {"loss": ..., other named terms}` (also `forward`,
  so DistributedDataParallel can wrap the method and synchronise its gradients);
- `parameter_groups()` (per-group `lr_scale`, e.g. ProPos's 10x predictor);
- `after_optimizer_step(progress)` (momentum/EMA updates, queues);
- the EM loop: `wants_pseudo_labels(epoch)`, then `update_from_features(features, cluster, K)` with
  the whole dataset's features named `pseudo_label_feature_kind`; by default that is one k-means
  and `set_pseudo_labels(labels, centroids)` (PCL overrides it to cluster at several granularities);
- evaluation: `eval_features(images, kind)` for k-means read-outs; methods with a clustering head
  set `has_head` and implement `head_predictions(images)`.
Method state that must survive a restart (prototypes, pseudo-labels, queues) lives in registered
buffers, so `state_dict()` is the checkpoint's method state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from utils.registry import Registry


@dataclass(kw_only=True)
class MethodConfig:
    """Options common to every method; each method subclasses this with its own fields."""
    name: str

    @classmethod
    def eval_feature_choices(cls) -> tuple[str, ...]:
        return ("backbone",)

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about its data to build itself."""
    in_channels: int
    image_size: int
    num_classes: int
    num_samples: int       # N of the training set (pseudo-labels are indexed by dataset position)
    num_clusters: int      # K of the EM loop's k-means


@dataclass(frozen=True)
class Progress:
    """Where training is; methods derive schedules (warm-up, momentum) from it."""
    epoch: int
    global_step: int
    steps_per_epoch: int
    total_steps: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.global_step / max(1, self.total_steps))


class Method(nn.Module):
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    num_views: ClassVar[int] = 2
    default_eval_features: ClassVar[str] = "backbone"
    pseudo_label_feature_kind: ClassVar[str] = "backbone"   # what the EM loop clusters (an eval_features kind)
    has_head: ClassVar[bool] = False                          # read out clusters from head_predictions()

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor, progress: Progress) -> dict[str, torch.Tensor]:
        return self.training_step(views, indices, progress)

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                      progress: Progress) -> dict[str, torch.Tensor]:
        """views: `num_views` tensors (B, C, H, W); indices (B,) dataset positions.
        Returns named scalar terms; "loss" is the one to minimise."""
        raise NotImplementedError

    def parameter_groups(self) -> list[dict]:
        """Optimizer groups; each may carry `lr_scale` (x base lr) and `weight_decay`."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def after_optimizer_step(self, progress: Progress) -> None:
        pass

    # ---- EM loop
    def wants_pseudo_labels(self, epoch: int) -> bool:
        return False

    def update_from_features(self, features: torch.Tensor, cluster: ClusterFn, num_clusters: int) -> None:
        """E-step on the whole training set's features (N, D), identical on every rank."""
        labels, centroids = cluster(features, num_clusters)
        self.set_pseudo_labels(labels, centroids)

    def set_pseudo_labels(self, labels: torch.Tensor, centroids: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not use pseudo-labels")

    # ---- evaluation
    def eval_features(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) features named `kind` (one of config_class.eval_feature_choices())."""
        raise NotImplementedError

    def head_predictions(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B,) cluster ids, for methods with `has_head`."""
        raise NotImplementedError(f"{type(self).__name__} has no clustering head")


ClusterFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""k-means as the config sets it: (features (N, D), K) -> (labels (N,), centroids (K, D)), same on every rank."""


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Class decorator: register a Method subclass under `name` (its config's `name` default)."""
    def decorator(cls: type[Method]) -> type[Method]:
        METHODS.register(name)(cls)
        return cls
    return decorator
