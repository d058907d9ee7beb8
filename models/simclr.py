"""SimCLR (Chen et al., ICML 2020): backbone -> projector, NT-Xent between two views.

The loss runs over the global batch: projections are gathered across ranks with
utils.distributed.all_gather_with_grad (gradients summed back to the rank that made each row), so
W ranks with B images each compute exactly the gradient of one process with W*B images: every
image has the whole global batch as negatives. The clustering read-out is k-means on backbone
features (the SCAN / ProPos baseline protocol).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from losses.contrastive import nt_xent_loss
from models.backbones import build_backbone, mlp
from models.base import DataInfo, Method, MethodConfig, Progress, register_method
from utils import distributed as du
from utils.config import ConfigError


@dataclass(kw_only=True)
class SimCLRConfig(MethodConfig):
    name: str = "simclr"
    projector_hidden_dim: int = 512
    feature_dim: int = 128               # projector output, where NT-Xent compares views
    projector_bn: bool = False           # BN in the projector's hidden layer (SCAN's head has none)
    temperature: float = 0.1
    # True: all 2N views are anchors (SimCLR's paper); False: only the first view's N rows are
    # anchors, the denominators still over all 2N (SCAN's pretext code).
    symmetric: bool = True

    @classmethod
    def eval_feature_choices(cls) -> tuple[str, ...]:
        return ("backbone", "projector")

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature: expected a value > 0, got {self.temperature}")
        for key in ("projector_hidden_dim", "feature_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key}: expected a value >= 1, got {getattr(self, key)}")


def simclr_terms(backbone: nn.Module, projector: nn.Module, x1: torch.Tensor, x2: torch.Tensor, *,
                 temperature: float, symmetric: bool) -> dict[str, torch.Tensor]:
    """SimCLR's step (also SCAN's pretext): two views (B, C, H, W) -> {"loss", "nt_xent"}, NT-Xent of
    their projections over the global batch. One forward for both views: BN statistics over the 2B
    images, as SimCLR's reference."""
    z1, z2 = projector(backbone(torch.cat([x1, x2]))).chunk(2)
    loss = nt_xent_loss(du.all_gather_with_grad(z1), du.all_gather_with_grad(z2), temperature=temperature,
                        symmetric=symmetric)
    return {"loss": loss, "nt_xent": loss.detach()}


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, *, bn: bool, norm: str) -> nn.Sequential:
    """Linear -> [BN] -> ReLU -> Linear (SimCLR's and CC's heads; no BN unless asked and norm allows)."""
    return mlp(in_dim, hidden_dim, out_dim, norm="batch" if bn and norm != "none" else "none")


@register_method("simclr")
class SimCLR(Method):
    config_class: ClassVar[type[MethodConfig]] = SimCLRConfig
    default_eval_features: ClassVar[str] = "backbone"

    def __init__(self, cfg: SimCLRConfig, *, backbone: str, norm: str, data: DataInfo):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(backbone, in_channels=data.in_channels, image_size=data.image_size, norm=norm)
        self.projector = projection_head(self.backbone.out_dim, cfg.projector_hidden_dim, cfg.feature_dim,
                                         bn=cfg.projector_bn, norm=norm)

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                      progress: Progress) -> dict[str, torch.Tensor]:
        x1, x2 = views
        return simclr_terms(self.backbone, self.projector, x1, x2, temperature=self.cfg.temperature,
                            symmetric=self.cfg.symmetric)

    def eval_features(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "backbone":
            return self.backbone(images)
        if kind == "projector":
            return F.normalize(self.projector(self.backbone(images)), dim=1)
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {SimCLRConfig.eval_feature_choices()}")
