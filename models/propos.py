"""ProPos: prototype scattering and positive sampling on a BYOL backbone (Huang et al., TPAMI 2022).

Online branch: backbone -> projector -> predictor; target branch: an EMA copy of backbone ->
projector. Per step, two views x1, x2:
- positive sampling alignment: predictor(q1 + sigma * eps) should match normalise(k2), BYOL's
  2 - 2 cos; symmetrised with (x2, x1);
- prototype scattering: over the global batch (gathered across ranks, gradients summed back, see
  utils.distributed.all_gather_with_grad), in-batch cluster prototypes of the online view are pulled
  to the same cluster's prototype in the target view and pushed from the other clusters';
- during `warmup_epochs` the method is plain BYOL (no scattering, no latent noise) and needs no
  pseudo-labels, so the EM loop's k-means starts at the last warm-up epoch's end.

Documented decision (propos.md, pitfalls): the reference all-gathers q without summing gradients
across ranks, so its scattering gradient is scaled by 1/world_size (its weight 0.1 on 4 GPUs acts as
0.025 here). We compute the exact gradient of the global-batch loss: 1 rank and W ranks agree for the
same global batch. The shipped 4-GPU paper configs state which weight they use and why.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from losses.propos import byol_alignment_loss, prototype_scattering_loss
from models.backbones import build_backbone, mlp
from models.base import DataInfo, Method, MethodConfig, Progress, ema_update_, register_method
from utils import distributed as du
from utils.config import ConfigError


@dataclass(kw_only=True)
class ProPosConfig(MethodConfig):
    name: str = "propos"
    projector_hidden_dim: int = 4096
    feature_dim: int = 256               # projector / predictor output
    predictor_hidden_dim: int = 4096
    predictor_lr_scale: float = 10.0     # the predictor's lr is this many times the base lr
    momentum_base: float = 0.996         # target EMA momentum
    momentum_schedule: str = "constant"  # constant | cosine (rises to 1 along a cosine over training)
    latent_std: float = 0.001            # sigma of positive sampling
    cluster_loss_weight: float = 0.1     # weight of the prototype scattering loss
    temperature: float = 0.5             # of the prototype scattering loss
    warmup_epochs: int = 50              # plain BYOL epochs before the clustering terms start
    symmetric: bool = True
    shuffling_bn: bool = True            # shuffle the target's batch across ranks (ignored on 1 rank or with SyncBN)
    # What the EM loop's k-means clusters into pseudo-labels: the paper's normalised target projections,
    # or the target backbone's features (which cluster better on short runs: see the demo config).
    pseudo_label_features: str = "projector"

    @classmethod
    def eval_feature_choices(cls) -> tuple[str, ...]:
        return ("projector", "backbone", "online_backbone")

    def validate(self) -> None:
        if self.momentum_schedule not in ("constant", "cosine"):
            raise ConfigError(f"method.momentum_schedule: expected constant or cosine, got {self.momentum_schedule!r}")
        for key in ("projector_hidden_dim", "feature_dim", "predictor_hidden_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key}: expected a width >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.momentum_base <= 1.0:
            raise ConfigError(f"method.momentum_base: expected a value in [0, 1], got {self.momentum_base}")
        for key in ("latent_std", "cluster_loss_weight", "predictor_lr_scale"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key}: expected a value >= 0, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature: expected a value > 0, got {self.temperature}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"method.warmup_epochs: expected a value >= 0, got {self.warmup_epochs}")
        if self.pseudo_label_features not in self.eval_feature_choices():
            raise ConfigError(f"method.pseudo_label_features: expected one of "
                              f"{', '.join(self.eval_feature_choices())}, got {self.pseudo_label_features!r}")


@register_method("propos")
class ProPos(Method):
    config_class: ClassVar[type[MethodConfig]] = ProPosConfig
    default_eval_features: ClassVar[str] = "projector"
    per_sample_buffers: ClassVar[tuple[str, ...]] = ("pseudo_labels",)

    def __init__(self, cfg: ProPosConfig, *, backbone: str, norm: str, data: DataInfo):
        super().__init__()
        self.cfg = cfg
        self.num_clusters = data.num_clusters
        self.shuffle_target_bn = cfg.shuffling_bn and norm == "batch"
        self.backbone = build_backbone(backbone, in_channels=data.in_channels, image_size=data.image_size, norm=norm)
        self.projector = mlp(self.backbone.out_dim, cfg.projector_hidden_dim, cfg.feature_dim, norm=norm)
        self.predictor = mlp(cfg.feature_dim, cfg.predictor_hidden_dim, cfg.feature_dim, norm=norm)
        for layer in self.predictor:
            if isinstance(layer, nn.Linear):  # as the reference: N(0, 0.01) weights, zero biases
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)
        self.target_backbone = copy.deepcopy(self.backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)
        # EM-loop state, checkpointed with the model: pseudo-label of every dataset position, and the
        # k-means prototypes (kept for inspection and resumption; the loss uses only the labels).
        self.register_buffer("pseudo_labels", torch.full((data.num_samples,), -1, dtype=torch.long))
        prototype_dim = cfg.feature_dim if cfg.pseudo_label_features == "projector" else self.backbone.out_dim
        self.register_buffer("prototypes", torch.zeros(data.num_clusters, prototype_dim))

    def target_parameters(self):
        yield from self.target_backbone.parameters()
        yield from self.target_projector.parameters()

    # ------------------------------------------------------------------ schedule
    def clustering_active(self, epoch: int) -> bool:
        return self.cfg.cluster_loss_weight > 0 and epoch >= self.cfg.warmup_epochs

    def momentum(self, progress: Progress) -> float:
        base = self.cfg.momentum_base
        if self.cfg.momentum_schedule == "constant":
            return base
        return 1.0 - (1.0 - base) * (math.cos(math.pi * progress.fraction) + 1.0) / 2.0

    # ------------------------------------------------------------------ training
    def parameter_groups(self) -> list[dict]:
        return [
            {"params": list(self.backbone.parameters()) + list(self.projector.parameters()), "lr_scale": 1.0},
            {"params": list(self.predictor.parameters()), "lr_scale": self.cfg.predictor_lr_scale},
        ]

    def _target_projection(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised target projections (B, D), no autograd graph (run under inference mode)."""
        return du.run_on_shuffled_batch(lambda x: F.normalize(self.target_projector(self.target_backbone(x)), dim=1),
                                        images, shuffle=self.shuffle_target_bn)

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                      progress: Progress) -> dict[str, torch.Tensor]:
        x1, x2 = views
        clustering = self.clustering_active(progress.epoch)
        sigma = self.cfg.latent_std if clustering else 0.0
        with torch.inference_mode():
            k1, k2 = self._target_projection(x1), self._target_projection(x2)
        # Tensors made under inference mode cannot be saved for backward; clone into normal tensors.
        k1, k2 = k1.clone(), k2.clone()
        q1 = self.projector(self.backbone(x1))
        q2 = self.projector(self.backbone(x2)) if self.cfg.symmetric or clustering else None

        def predict(q: torch.Tensor) -> torch.Tensor:
            return self.predictor(q + sigma * torch.randn_like(q) if sigma > 0 else q)

        align = byol_alignment_loss(predict(q1), k2)
        if self.cfg.symmetric:
            align = 0.5 * (align + byol_alignment_loss(predict(q2), k1))
        terms = {"align": align.detach()}
        loss = align
        if clustering:
            labels = self.pseudo_labels[indices]
            if bool((labels < 0).any()):
                raise RuntimeError("prototype scattering needs pseudo-labels, but some are unset: "
                                   "the EM loop must cluster before the first clustering epoch")
            labels_all = du.all_gather_no_grad(labels)
            q1_all = du.all_gather_with_grad(F.normalize(q1, dim=1))
            q2_all = du.all_gather_with_grad(F.normalize(q2, dim=1))
            k1_all, k2_all = du.all_gather_no_grad(k1), du.all_gather_no_grad(k2)
            psl_kwargs = dict(num_clusters=self.num_clusters, temperature=self.cfg.temperature)
            psl = 0.5 * (prototype_scattering_loss(q1_all, k2_all, labels_all, **psl_kwargs)
                         + prototype_scattering_loss(q2_all, k1_all, labels_all, **psl_kwargs))
            loss = loss + self.cfg.cluster_loss_weight * psl
            terms["psl"] = psl.detach()
        terms["loss"] = loss
        return terms

    @torch.no_grad()
    def after_optimizer_step(self, progress: Progress) -> None:
        ema_update_(list(self.target_parameters()),
                    list(self.backbone.parameters()) + list(self.projector.parameters()), self.momentum(progress))

    # ------------------------------------------------------------------ EM loop
    @property
    def pseudo_label_feature_kind(self) -> str:
        return self.cfg.pseudo_label_features

    def wants_pseudo_labels(self, epoch: int) -> bool:
        return self.clustering_active(epoch)

    def set_pseudo_labels(self, labels: torch.Tensor, centroids: torch.Tensor) -> None:
        self.pseudo_labels.copy_(labels.to(self.pseudo_labels.device))
        self.prototypes.copy_(centroids.to(self.prototypes))

    # ------------------------------------------------------------------ evaluation
    def eval_features(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "projector":  # the paper's read-out and the EM loop's features
            return F.normalize(self.target_projector(self.target_backbone(images)), dim=1)
        if kind == "backbone":
            return self.target_backbone(images)
        if kind == "online_backbone":
            return self.backbone(images)
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {ProPosConfig.eval_feature_choices()}")
