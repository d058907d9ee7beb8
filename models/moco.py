"""MoCo v2 (Chen, Fan, Girshick & He, 2020): a momentum key encoder and a queue of negatives.

Query encoder: backbone -> MLP projector (v2's head) -> normalise; key encoder: an EMA copy of both,
updated after each optimiser step with momentum `momentum`. Per step, two views x1, x2:
- keys k = key_encoder(x2) under inference mode, with shuffling BN across ranks (the key batch is
  permuted over the global batch before the key encoder and un-permuted after, so a query and its
  key never share BN statistics, which would let the network cheat);
- InfoNCE(q1, k2, queue, temperature) (losses/moco.py); with `symmetric`, the mean with
  InfoNCE(q2, k1, queue) and both key batches are enqueued;
- after the optimiser step, the global batch of keys (all ranks, rank order, via all_gather) replaces
  the oldest queue rows; the queue and its pointer are buffers, so they are checkpointed and every rank
  holds the same queue.
The queue starts as random unit vectors drawn from a fixed seed (identical on every rank).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from losses.moco import info_nce_loss
from models.backbones import build_backbone, mlp
from models.base import DataInfo, Method, MethodConfig, Progress, ema_update_, register_method
from utils import distributed as du
from utils.config import ConfigError


@dataclass(kw_only=True)
class MoCoConfig(MethodConfig):
    name: str = "moco"
    projector_hidden_dim: int = 2048
    feature_dim: int = 128
    queue_size: int = 65536          # keys kept as negatives (ProPos: 65,536; PCL's CIFAR baseline: 4,096)
    momentum: float = 0.999          # key encoder EMA
    temperature: float = 0.07        # ProPos's code: "0.1 for cifar10"
    symmetric: bool = False
    shuffling_bn: bool = True        # ignored on 1 rank (BN statistics do not depend on order) or with SyncBN

    @classmethod
    def eval_feature_choices(cls) -> tuple[str, ...]:
        return ("backbone", "key_backbone", "projector")

    def validate(self) -> None:
        if self.queue_size < 1:
            raise ConfigError(f"method.queue_size: expected a positive integer, got {self.queue_size}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"method.momentum: expected a value in [0, 1], got {self.momentum}")
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature: expected a value > 0, got {self.temperature}")
        for key in ("projector_hidden_dim", "feature_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key}: expected a positive integer, got {getattr(self, key)}")


@register_method("moco")
class MoCo(Method):
    config_class: ClassVar[type[MethodConfig]] = MoCoConfig
    default_eval_features: ClassVar[str] = "backbone"

    def __init__(self, cfg: MoCoConfig, *, backbone: str, norm: str, data: DataInfo):
        super().__init__()
        self.cfg = cfg
        self.shuffle_key_bn = cfg.shuffling_bn and norm == "batch"
        self.backbone = build_backbone(backbone, in_channels=data.in_channels, image_size=data.image_size, norm=norm)
        self.projector = mlp(self.backbone.out_dim, cfg.projector_hidden_dim, cfg.feature_dim, norm=norm)
        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_projector = copy.deepcopy(self.projector)
        for p in self.key_parameters():
            p.requires_grad_(False)
        init = torch.randn(cfg.queue_size, cfg.feature_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("queue", F.normalize(init, dim=1))                   # (K, D), rows are keys
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))     # next row to overwrite
        self._pending_keys: torch.Tensor | None = None                           # this step's keys, enqueued after it

    def check_batch(self, *, batch_size_per_rank: int, world_size: int) -> None:
        # Keys enqueued per step: every rank's batch, twice when both views serve as queries.
        keys = batch_size_per_rank * world_size * (2 if self.cfg.symmetric else 1)
        if keys > self.cfg.queue_size:
            views = " x 2 views, method.symmetric" if self.cfg.symmetric else ""
            raise ValueError(f"method.queue_size: {self.cfg.queue_size} rows, fewer than the {keys} keys enqueued per "
                             f"step (train.batch_size_per_rank={batch_size_per_rank} x {world_size} rank(s){views}); "
                             f"expected at least {keys}")

    def key_parameters(self):
        yield from self.key_backbone.parameters()
        yield from self.key_projector.parameters()

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.backbone.parameters()) + list(self.projector.parameters()), "lr_scale": 1.0}]

    # ------------------------------------------------------------------ training
    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised keys (B, D) of the key encoder; call under inference mode."""
        return du.run_on_shuffled_batch(lambda x: F.normalize(self.key_projector(self.key_backbone(x)), dim=1),
                                        images, shuffle=self.shuffle_key_bn)

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                      progress: Progress) -> dict[str, torch.Tensor]:
        loss, _ = self.contrastive_step(views)
        return {"loss": loss}

    def contrastive_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """This step's InfoNCE and the normalised queries (B, D) with gradient: [q1], or [q1, q2] when
        symmetric. Keeps the keys for `after_optimizer_step` to enqueue. Subclasses (PCL) add terms on q."""
        x1, x2 = views
        with torch.inference_mode():
            k2 = self._keys(x2)
            k1 = self._keys(x1) if self.cfg.symmetric else None
        # Inference-mode tensors cannot be saved for backward: clone into normal tensors. The queue is
        # cloned too, since after_optimizer_step overwrites it in place.
        queue = self.queue.clone()
        k2 = k2.clone()
        q1 = F.normalize(self.projector(self.backbone(x1)), dim=1)
        loss = info_nce_loss(q1, k2, queue, self.cfg.temperature)
        if self.cfg.symmetric:
            k1 = k1.clone()
            q2 = F.normalize(self.projector(self.backbone(x2)), dim=1)
            loss = 0.5 * (loss + info_nce_loss(q2, k1, queue, self.cfg.temperature))
            self._pending_keys = torch.cat([k1, k2])
            return loss, [q1, q2]
        self._pending_keys = k2
        return loss, [q1]

    @torch.no_grad()
    def after_optimizer_step(self, progress: Progress) -> None:
        ema_update_(list(self.key_parameters()),
                    list(self.backbone.parameters()) + list(self.projector.parameters()), self.cfg.momentum)
        if self._pending_keys is not None:
            self.enqueue(self._pending_keys)
            self._pending_keys = None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the keys (B, D) of every rank, in rank order, over the oldest queue rows (wrapping)."""
        keys = du.all_gather_no_grad(keys.detach().contiguous())
        size = self.queue.shape[0]
        if keys.shape[0] > size:  # check_batch refuses such a config before training
            raise RuntimeError(f"method.queue_size={size} is smaller than the {keys.shape[0]} keys enqueued per step")
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=self.queue.device)) % size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    # ------------------------------------------------------------------ evaluation
    def eval_features(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "backbone":  # the query encoder, which MoCo transfers downstream
            return self.backbone(images)
        if kind == "key_backbone":
            return self.key_backbone(images)
        if kind == "projector":
            return F.normalize(self.projector(self.backbone(images)), dim=1)
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {MoCoConfig.eval_feature_choices()}")
