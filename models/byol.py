"""BYOL (Grill et al., NeurIPS 2020): ProPos with its clustering terms off.

Same networks and training step as ProPos (models/propos.py); the defaults differ: no prototype
scattering, no positive sampling noise, and the target momentum rises from `momentum_base` to 1
along a cosine, as in the BYOL paper. It never asks the EM loop for pseudo-labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from models.base import MethodConfig, register_method
from models.propos import ProPos, ProPosConfig
from utils.config import ConfigError


@dataclass(kw_only=True)
class BYOLConfig(ProPosConfig):
    name: str = "byol"
    cluster_loss_weight: float = 0.0
    latent_std: float = 0.0
    momentum_schedule: str = "cosine"
    warmup_epochs: int = 0

    def validate(self) -> None:
        super().validate()
        if self.cluster_loss_weight != 0 or self.latent_std != 0:
            raise ConfigError("method.cluster_loss_weight / method.latent_std: BYOL has no clustering terms; "
                              "use method.name=propos to turn them on")


@register_method("byol")
class BYOL(ProPos):
    config_class: ClassVar[type[MethodConfig]] = BYOLConfig
