"""IDEC (Guo, Gao, Liu, Yin, IJCAI 2017): DEC that keeps the decoder, so clustering does not distort
the embedding: L = L_r + gamma * L_c, gamma (0.1 in the paper) on the CLUSTERING term, L_c = KL(P || Q)
with DEC's whole-dataset target held for `update_interval` steps and DEC's tol stopping rule.
Everything else (stages, pretraining, k-means initialisation, read-out) is DEC's (models/dec.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from losses.dec import idec_loss, soft_assignment
from models.base import MethodConfig, register_method
from models.dec import DEC, DECConfig
from utils.config import ConfigError


@dataclass(kw_only=True)
class IDECConfig(DECConfig):
    name: str = "idec"
    gamma: float = 0.1                 # weight of the clustering term: L = L_r + gamma * KL(P || Q)
    cluster_optimizer: str = "adam"    # IDEC on MNIST: Adam, lr 0.001
    cluster_lr: float = 1.0e-3

    def validate(self) -> None:
        super().validate()
        if self.gamma < 0:
            raise ConfigError(f"method.gamma: expected a value >= 0, got {self.gamma}")


@register_method("idec")
class IDEC(DEC):
    config_class: ClassVar[type[MethodConfig]] = IDECConfig

    def trainable_in_cluster_stage(self) -> list[nn.Parameter]:
        """IDEC keeps the decoder: the whole autoencoder and the centroids train."""
        return [*self.autoencoder.parameters(), self.centroids]

    def clustering_step(self, x: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.autoencoder.encode(x)
        q = soft_assignment(z, self.centroids, alpha=self.cfg.alpha)
        terms = idec_loss(reconstruction=self.autoencoder.decode(z), inputs=x, p=self.target[indices], q=q,
                          gamma=self.cfg.gamma)
        return {k: v if k == "loss" else v.detach() for k, v in terms.items()}
