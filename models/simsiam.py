"""SimSiam (Chen & He, CVPR 2021): a siamese network without negatives, momentum or a target copy.

backbone -> projector z -> predictor p; loss 1/2 D(p1, sg(z2)) + 1/2 D(p2, sg(z1)), D = -cos
(losses/simsiam.py). The stop-gradient is the whole trick: both branches share every weight.

- projector: the CIFAR variant, two layers Linear-BN-ReLU-Linear-BN (the ImageNet one has three);
  the last BN has no affine parameters, as in the reference, so the projection stays centred;
- predictor: the bottleneck Linear(D, h)-BN-ReLU-Linear(h, D), h = `predictor_hidden_dim` (D/4);
- the reference keeps the predictor's lr fixed at the base lr (no warm-up, no cosine):
  `fixed_predictor_lr: true` (default) does that; false lets it follow the schedule;
  `predictor_lr_scale` sets its ratio to the base lr either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from losses.simsiam import simsiam_loss
from models.backbones import build_backbone, norm1d
from models.base import DataInfo, Method, MethodConfig, Progress, register_method
from utils.config import ConfigError


@dataclass(kw_only=True)
class SimSiamConfig(MethodConfig):
    name: str = "simsiam"
    feature_dim: int = 2048              # projector output = predictor output
    projector_hidden_dim: int = 2048
    predictor_hidden_dim: int = 512      # the bottleneck (D/4 in the paper)
    predictor_lr_scale: float = 1.0
    fixed_predictor_lr: bool = True      # the reference's fixed predictor lr

    @classmethod
    def eval_feature_choices(cls) -> tuple[str, ...]:
        return ("backbone", "projector")

    def validate(self) -> None:
        for key in ("feature_dim", "projector_hidden_dim", "predictor_hidden_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key}: expected a positive integer, got {getattr(self, key)}")
        if self.predictor_lr_scale < 0:
            raise ConfigError(f"method.predictor_lr_scale: expected a value >= 0, got {self.predictor_lr_scale}")


def simsiam_projector(in_dim: int, hidden_dim: int, out_dim: int, *, norm: str) -> nn.Sequential:
    """CIFAR SimSiam projector: Linear-BN-ReLU-Linear-BN, the last BN without affine parameters."""
    last_norm = nn.Identity() if norm == "none" else nn.BatchNorm1d(out_dim, affine=False)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=norm == "none"), norm1d(norm, hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=norm == "none"), last_norm)


@register_method("simsiam")
class SimSiam(Method):
    config_class: ClassVar[type[MethodConfig]] = SimSiamConfig
    default_eval_features: ClassVar[str] = "backbone"

    def __init__(self, cfg: SimSiamConfig, *, backbone: str, norm: str, data: DataInfo):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(backbone, in_channels=data.in_channels, image_size=data.image_size, norm=norm)
        self.projector = simsiam_projector(self.backbone.out_dim, cfg.projector_hidden_dim, cfg.feature_dim, norm=norm)
        self.predictor = nn.Sequential(nn.Linear(cfg.feature_dim, cfg.predictor_hidden_dim, bias=norm == "none"),
                                       norm1d(norm, cfg.predictor_hidden_dim), nn.ReLU(inplace=True),
                                       nn.Linear(cfg.predictor_hidden_dim, cfg.feature_dim))

    def parameter_groups(self) -> list[dict]:
        return [
            {"params": list(self.backbone.parameters()) + list(self.projector.parameters()), "lr_scale": 1.0},
            {"params": list(self.predictor.parameters()), "lr_scale": self.cfg.predictor_lr_scale,
             "fixed_lr": self.cfg.fixed_predictor_lr},
        ]

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                      progress: Progress) -> dict[str, torch.Tensor]:
        x1, x2 = views
        # Two passes, not one over 2B images: each view gets its own BN statistics, as in the reference.
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = simsiam_loss(p1, p2, z1, z2)
        # Collapse monitor: the per-dimension std of normalised z is 1/sqrt(D) when healthy, 0 when collapsed.
        z_std = F.normalize(z1.detach(), dim=1).std(dim=0).mean()
        return {"loss": loss, "z_std": z_std}

    def eval_features(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "backbone":
            return self.backbone(images)
        if kind == "projector":
            return F.normalize(self.projector(self.backbone(images)), dim=1)
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {SimSiamConfig.eval_feature_choices()}")
