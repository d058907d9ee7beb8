"""CC, Contrastive Clustering (Li et al., AAAI 2021): instance- and cluster-level contrast.

backbone -> instance head (Linear -> ReLU -> Linear, NT-Xent between the two views' rows, tau_I)
         -> cluster head (Linear -> ReLU -> Linear -> softmax over K = data.num_clusters).
The cluster loss contrasts the K columns of the two views' (N, K) assignment matrices (tau_C) and
adds, per view, log K - H(cluster sizes) (losses/cc.py). Loss = instance + cluster.
Clusters are read from the head's argmax (`has_head`).

Both contrasts run over the global batch: rows and assignment matrices are gathered across ranks
with gradients (utils.distributed.all_gather_with_grad), so W ranks give the one-process gradient of
the W*B batch. The reference is one-GPU only; a multi-GPU port that contrasted per-rank columns was
reported to lose about 10 points of ACC, since each rank then sees only B/K images per cluster column.

STL-10 with its unlabeled images (data.stl10_unlabeled=true), as CC trains it: each epoch first visits
the 100,000 unlabeled images with the instance loss alone, then train+test with both losses
(`extra_rows_apart`: the loader's phases keep the two kinds in separate steps). The cluster head sits out
the instance-only steps: it joins their loss with weight 0, for DistributedDataParallel, and its
gradients are dropped (`parameters_left_alone`), so Adam leaves it and its moments as they were. That
is the reference under torch >= 2.0, whose `zero_grad()` sets gradients to None; under torch 1.x it
zeroed them instead, and Adam kept moving the head on its momentum for a few steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from losses.cc import cluster_contrastive_loss, cluster_entropy_loss
from losses.contrastive import nt_xent_loss
from models.backbones import build_backbone
from models.base import DataInfo, Method, MethodConfig, Progress, register_method
from models.simclr import projection_head
from utils import distributed as du
from utils.config import ConfigError


@dataclass(kw_only=True)
class CCConfig(MethodConfig):
    name: str = "cc"
    instance_hidden_dim: int = 512
    feature_dim: int = 128               # instance head output
    cluster_hidden_dim: int = 512
    head_bn: bool = False                # BN in both heads' hidden layers (the reference has none)
    instance_temperature: float = 0.5
    cluster_temperature: float = 1.0
    entropy_weight: float = 1.0          # weight of log K - H(P) per view (1 in the reference)

    @classmethod
    def eval_feature_choices(cls) -> tuple[str, ...]:
        return ("backbone", "instance", "cluster")

    def validate(self) -> None:
        for key in ("instance_temperature", "cluster_temperature"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"method.{key}: expected a value > 0, got {getattr(self, key)}")
        if self.entropy_weight < 0:
            raise ConfigError(f"method.entropy_weight: expected a value >= 0, got {self.entropy_weight}")
        for key in ("instance_hidden_dim", "feature_dim", "cluster_hidden_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key}: expected a value >= 1, got {getattr(self, key)}")


@register_method("cc")
class CC(Method):
    config_class: ClassVar[type[MethodConfig]] = CCConfig
    default_eval_features: ClassVar[str] = "backbone"   # for k-means read-outs; evaluation uses the head
    has_head: ClassVar[bool] = True
    head_feature_kind: ClassVar[str | None] = "cluster"
    extra_rows_apart: ClassVar[bool] = True

    def __init__(self, cfg: CCConfig, *, backbone: str, norm: str, data: DataInfo):
        super().__init__()
        if data.num_clusters < 2:
            raise ValueError(f"CC needs at least 2 clusters, got num_clusters={data.num_clusters}")
        self.cfg = cfg
        self.num_clusters = data.num_clusters
        self.backbone = build_backbone(backbone, in_channels=data.in_channels, image_size=data.image_size, norm=norm)
        dim = self.backbone.out_dim
        self.instance_head = projection_head(dim, cfg.instance_hidden_dim, cfg.feature_dim, bn=cfg.head_bn, norm=norm)
        self.cluster_head = projection_head(dim, cfg.cluster_hidden_dim, data.num_clusters, bn=cfg.head_bn, norm=norm)
        # Rows from here on train the instance loss alone (None: the training set has no extra rows).
        self.first_extra_row = data.num_samples - data.num_extra_rows if data.num_extra_rows else None
        self._left_alone: list[torch.nn.Parameter] = []

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                      progress: Progress) -> dict[str, torch.Tensor]:
        x1, x2 = views
        h = self.backbone(torch.cat([x1, x2]))
        z1, z2 = self.instance_head(h).chunk(2)
        z1, z2 = du.all_gather_with_grad(z1), du.all_gather_with_grad(z2)
        instance = nt_xent_loss(z1, z2, temperature=self.cfg.instance_temperature, symmetric=True)
        self._left_alone = []
        if self._extra_rows(indices):
            # Every parameter must take part for DistributedDataParallel: the cluster head with weight 0.
            self._left_alone = list(self.cluster_head.parameters())
            idle = sum(p.sum() for p in self._left_alone) * 0.0
            return {"loss": instance + idle, "instance": instance.detach()}
        p1, p2 = F.softmax(self.cluster_head(h), dim=1).chunk(2)
        p1, p2 = du.all_gather_with_grad(p1), du.all_gather_with_grad(p2)
        contrast = cluster_contrastive_loss(p1, p2, temperature=self.cfg.cluster_temperature)
        entropy = cluster_entropy_loss(p1, p2)
        loss = instance + contrast + self.cfg.entropy_weight * entropy
        return {"loss": loss, "instance": instance.detach(), "cluster": contrast.detach(),
                "entropy": entropy.detach()}

    def _extra_rows(self, indices: torch.Tensor) -> bool:
        """Whether the batch holds extra rows only (instance loss alone); a batch that mixes them with
        clustered rows is an error (the trainer's phases keep every global batch to one kind)."""
        if self.first_extra_row is None:
            return False   # no check, no device sync
        extra = indices >= self.first_extra_row
        if bool(extra.all()):
            return True
        if bool(extra.any()):
            raise RuntimeError(f"CC: a batch mixes extra rows (>= {self.first_extra_row}) with clustered ones; "
                               "train them in the loader's phases (Method.extra_rows_apart)")
        return False

    def parameters_left_alone(self) -> list[torch.nn.Parameter]:
        """The cluster head after an instance-only step, else nothing."""
        return self._left_alone

    def cluster_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K) soft assignments."""
        return F.softmax(self.cluster_head(self.backbone(images)), dim=1)

    def predict_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K) soft assignments (the "cluster" features) -> (N,) argmax cluster ids."""
        return features.argmax(dim=1)

    def eval_features(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "backbone":
            return self.backbone(images)
        if kind == "instance":
            return F.normalize(self.instance_head(self.backbone(images)), dim=1)
        if kind == "cluster":
            return self.cluster_probabilities(images)
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {CCConfig.eval_feature_choices()}")
