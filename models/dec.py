"""DEC (Xie, Girshick, Farhadi, ICML 2016): Deep Embedded Clustering, as the paper defines it.

Stages of one run (the trainer's stages; each resumable, each with its own optimizer):
1. autoencoder pretraining: `pretrain: layerwise` is the paper's greedy layer-wise denoising (one stage
   per encoder/decoder pair, `layerwise_epochs` each, dropout `layerwise_dropout` on the pair's input and
   code), then `pretrain_epochs` of end-to-end fine-tuning; `pretrain: end_to_end` is the common
   shortcut (only the end-to-end stage). `pretrained: PATH` skips both and starts from the
   autoencoder of an earlier run's checkpoint (so DEC and IDEC share one pretraining);
2. `cluster`: the centroids mu are initialised by k-means (the `cluster` section: torch_clustering,
   `n_init` restarts) on the whole dataset's embeddings z; then the decoder is dropped and the encoder
   and mu minimise KL(P || Q), Q the Student's t soft assignment with `alpha`, and P the sharpened
   target computed from ALL N embeddings (gathered across ranks) every `update_interval` steps and
   held in between; the stage stops when fewer than a fraction `tol` of the points change their
   argmax-q cluster between two target updates.
The read-out is argmax q; NMI / ACC / ARI are logged at every target update.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from losses.dec import kl_clustering_loss, reconstruction_loss, soft_assignment, target_distribution
from models.autoencoder import AUTOENCODERS, build_autoencoder
from models.base import DataInfo, Method, MethodConfig, Progress, Stage, StageContext, register_method
from utils.config import ConfigError, check_momentum
from utils.optim import LR_SCHEDULES, OPTIMIZERS
from utils.registry import Registry

PRETRAIN_CHOICES = ("layerwise", "end_to_end")


@dataclass(kw_only=True)
class DECConfig(MethodConfig):
    name: str = "dec"
    # the autoencoder (model.backbone names it: mlp_autoencoder | conv_autoencoder)
    hidden_dims: list[int] = field(default_factory=lambda: [500, 500, 2000])  # d-500-500-2000-10
    embedding_dim: int = 10
    # Every input to the autoencoder is multiplied by this (reconstruction targets too). DEC's and
    # IDEC's MNIST code feed pixels / 50, i.e. 5.1 x the [0, 1] pixels (DEC's rule: mean squared input
    # of order 1); 1.0 keeps [0, 1].
    input_scale: float = 1.0
    # ---- pretraining (skipped when `pretrained` is set)
    pretrain: str = "end_to_end"       # layerwise (the paper: greedy denoising pairs, then fine-tuning) | end_to_end
    pretrained: str = ""               # checkpoint of an earlier run (e.g. runs/mnist_mlp_ae/last.pt): its autoencoder
    layerwise_epochs: int = 0          # per encoder/decoder pair (layerwise only)
    layerwise_dropout: float = 0.2     # on each pair's input and code (layerwise only)
    pretrain_epochs: int = 50          # end-to-end: the whole pretraining; layerwise: the fine-tuning after the pairs
    # Dropout on the input of the end-to-end stage (a denoising autoencoder: the clean input is the
    # target). 0 is the papers' fine-tuning; > 0 carries the pairs' denoising into the whole network.
    pretrain_input_dropout: float = 0.0
    pretrain_optimizer: str = "adam"
    pretrain_lr: float = 1.0e-3
    pretrain_momentum: float = 0.9
    pretrain_schedule: str = "constant"   # constant | cosine | step (the paper: lr / 10 every 20,000 iterations)
    pretrain_lr_step_iters: int = 20000   # step schedule: iterations between two lr divisions (per stage)
    pretrain_lr_step_factor: float = 0.1
    # ---- clustering
    cluster: bool = True               # false: pretraining only (a shared autoencoder for `pretrained`)
    cluster_epochs: int = 100          # at most; the tol rule usually stops earlier
    cluster_optimizer: str = "sgd"     # DEC: SGD 0.01, momentum 0.9
    cluster_lr: float = 0.01
    cluster_momentum: float = 0.9
    alpha: float = 1.0                 # Student's t degrees of freedom
    update_interval: int = 140         # steps between two whole-dataset target updates
    tol: float = 0.001                 # stop when fewer than this fraction of points change cluster between updates

    @classmethod
    def eval_feature_choices(cls) -> tuple[str, ...]:
        return ("embedding", "backbone")   # backbone: the encoder's output, the same embedding z

    @classmethod
    def backbone_registry(cls) -> Registry:
        return AUTOENCODERS

    def validate(self) -> None:
        def fail(key: str, message: str) -> None:
            raise ConfigError(f"method.{key}: {message}")

        if self.pretrain not in PRETRAIN_CHOICES:
            fail("pretrain", f"expected one of {', '.join(PRETRAIN_CHOICES)}, got {self.pretrain!r}")
        for key in ("pretrain_optimizer", "cluster_optimizer"):
            if getattr(self, key) not in OPTIMIZERS:
                fail(key, f"expected one of {', '.join(OPTIMIZERS)}, got {getattr(self, key)!r}")
        if self.pretrain_schedule not in LR_SCHEDULES:
            fail("pretrain_schedule", f"expected one of {', '.join(LR_SCHEDULES)}, got {self.pretrain_schedule!r}")
        if self.pretrain_lr_step_iters < 1:   # read by the step schedule only, but never meaningful below 1
            fail("pretrain_lr_step_iters", f"expected >= 1 iteration, got {self.pretrain_lr_step_iters}")
        if not 0.0 < self.pretrain_lr_step_factor <= 1.0:
            fail("pretrain_lr_step_factor", f"expected a factor in (0, 1], got {self.pretrain_lr_step_factor}")
        if not self.hidden_dims or min(self.hidden_dims) < 1 or self.embedding_dim < 1:
            fail("hidden_dims", f"expected positive widths and embedding_dim, got {self.hidden_dims}, "
                                f"{self.embedding_dim}")
        if not self.pretrained:
            if self.pretrain_epochs < 0 or self.layerwise_epochs < 0:
                fail("pretrain_epochs", "expected epochs >= 0")
            if self.pretrain == "layerwise" and self.layerwise_epochs < 1:
                fail("layerwise_epochs",
                     f"layerwise pretraining needs >= 1 epoch per pair, got {self.layerwise_epochs}")
            if self.pretrain == "end_to_end" and self.pretrain_epochs < 1:
                fail("pretrain_epochs", f"expected >= 1 (or set method.pretrained), got {self.pretrain_epochs}")
        if not self.cluster and self.pretrained:
            fail("cluster", "false with method.pretrained set leaves nothing to train")
        if self.cluster and self.cluster_epochs < 1:
            fail("cluster_epochs", f"expected >= 1, got {self.cluster_epochs}")
        for key in ("layerwise_dropout", "pretrain_input_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                fail(key, f"expected a probability in [0, 1), got {getattr(self, key)}")
        if not self.input_scale > 0:
            fail("input_scale", f"expected a value > 0, got {self.input_scale}")
        if self.alpha <= 0:
            fail("alpha", f"expected a value > 0, got {self.alpha}")
        if self.update_interval < 1:
            fail("update_interval", f"expected >= 1 step, got {self.update_interval}")
        if not 0.0 <= self.tol < 1.0:
            fail("tol", f"expected a fraction in [0, 1), got {self.tol}")
        for key in ("pretrain_lr", "cluster_lr"):
            if getattr(self, key) <= 0:
                fail(key, f"expected a value > 0, got {getattr(self, key)}")
        for key in ("pretrain_momentum", "cluster_momentum"):
            check_momentum(f"method.{key}", getattr(self, key))


def label_change_fraction(new: torch.Tensor, old: torch.Tensor) -> float:
    """Fraction of the N points whose cluster differs: new, old (N,) int -> float in [0, 1]."""
    return int((new != old).sum()) / max(1, new.numel())   # counted exactly, not a float32 mean


@register_method("dec")
class DEC(Method):
    config_class: ClassVar[type[MethodConfig]] = DECConfig
    num_views: ClassVar[int] = 1
    default_eval_features: ClassVar[str] = "embedding"
    pseudo_label_feature_kind: ClassVar[str] = "embedding"
    head_feature_kind: ClassVar[str | None] = "embedding"
    refresh_feature_kind: ClassVar[str] = "embedding"
    per_sample_buffers: ClassVar[tuple[str, ...]] = ("target", "last_labels")
    CLUSTER: ClassVar[str] = "cluster"

    def __init__(self, cfg: DECConfig, *, backbone: str, norm: str, data: DataInfo):
        super().__init__()
        if backbone not in AUTOENCODERS:
            raise ValueError(f"{cfg.name}: model.backbone must name an autoencoder "
                             f"({', '.join(AUTOENCODERS.names())}), got {backbone!r}")
        self.cfg = cfg
        self.autoencoder = build_autoencoder(backbone, in_channels=data.in_channels, image_size=data.image_size,
                                             hidden_dims=cfg.hidden_dims, embedding_dim=cfg.embedding_dim)
        if cfg.pretrain == "layerwise" and not cfg.pretrained and self.autoencoder.num_pairs == 0:
            raise ValueError(f"{cfg.name}: {backbone} has no layer-wise pretraining; use method.pretrain=end_to_end")
        self.centroids = nn.Parameter(torch.zeros(data.num_clusters, cfg.embedding_dim))
        # Method state in buffers (checkpointed): the held target P, the labels of the last update,
        # how many updates were made, whether the centroids exist and whether the tol rule fired.
        self.register_buffer("target", torch.zeros(data.num_samples, data.num_clusters))
        self.register_buffer("last_labels", torch.full((data.num_samples,), -1, dtype=torch.long))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("centroids_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("converged", torch.zeros((), dtype=torch.bool))
        self.stage = ""

    # ---- stages
    def training_stages(self) -> list[Stage]:
        c = self.cfg
        stages: list[Stage] = []
        if not c.pretrained:
            pretrain = dict(optimizer=c.pretrain_optimizer, lr=c.pretrain_lr, momentum=c.pretrain_momentum,
                            weight_decay=0.0, schedule=c.pretrain_schedule, warmup_epochs=0.0,
                            lr_step_every=c.pretrain_lr_step_iters, lr_step_factor=c.pretrain_lr_step_factor)
            if c.pretrain == "layerwise":
                stages += [Stage(name=f"layer{k + 1}", epochs=c.layerwise_epochs, **pretrain)
                           for k in range(self.autoencoder.num_pairs)]
                if c.pretrain_epochs:
                    stages.append(Stage(name="finetune", epochs=c.pretrain_epochs, **pretrain))
            else:
                stages.append(Stage(name="pretrain", epochs=c.pretrain_epochs, **pretrain))
        if c.cluster:
            stages.append(Stage(name=self.CLUSTER, epochs=c.cluster_epochs, optimizer=c.cluster_optimizer,
                                lr=c.cluster_lr, momentum=c.cluster_momentum, weight_decay=0.0,
                                schedule="constant", warmup_epochs=0.0))
        return stages

    def trainable_in_cluster_stage(self) -> list[nn.Parameter]:
        """DEC drops the decoder: the encoder and the centroids train."""
        return [*self.autoencoder.encoder.parameters(), self.centroids]

    def enter_stage(self, name: str) -> None:
        self.stage = name
        if name.startswith("layer"):
            trainable = self.autoencoder.pair_parameters(int(name[len("layer"):]) - 1)
        elif name == self.CLUSTER:
            trainable = self.trainable_in_cluster_stage()
        else:  # pretrain / finetune: the whole autoencoder, end to end
            trainable = list(self.autoencoder.parameters())
        chosen = {id(p) for p in trainable}
        for p in self.parameters():
            p.requires_grad_(id(p) in chosen)

    def start_stage(self, name: str, context: StageContext) -> None:
        if name != self.CLUSTER:
            return
        z = context.features("embedding")
        labels, _ = context.cluster(z, self.centroids.shape[0])
        # mu = the mean embedding of each k-means cluster (whatever metric the cluster section uses)
        sums = torch.zeros_like(self.centroids).index_add_(0, labels.to(z.device), z.to(self.centroids))
        counts = torch.bincount(labels, minlength=self.centroids.shape[0]).clamp_min(1).to(sums)
        with torch.no_grad():
            self.centroids.copy_(sums / counts.unsqueeze(1))
        self.last_labels.copy_(labels)
        self.num_updates.zero_()
        self.converged.fill_(False)
        self.centroids_ready.fill_(True)

    @property
    def has_head(self) -> bool:  # argmax q once the centroids exist, k-means of z before
        return bool(self.centroids_ready)

    # ---- step-level refresh: DEC's target distribution from the whole dataset
    @property
    def refresh_every_steps(self) -> int:
        return self.cfg.update_interval if self.stage == self.CLUSTER else 0

    @torch.no_grad()
    def refresh(self, features: torch.Tensor) -> dict[str, float]:
        """features: the embeddings z (N, D) of the whole training set in dataset order."""
        q = soft_assignment(features.to(self.centroids), self.centroids, alpha=self.cfg.alpha)
        labels = q.argmax(dim=1)
        changed = label_change_fraction(labels, self.last_labels)
        if int(self.num_updates) > 0 and changed < self.cfg.tol:
            self.converged.fill_(True)
        self.target.copy_(target_distribution(q))
        self.last_labels.copy_(labels)
        self.num_updates += 1
        return {"label_change": changed, "target_updates": float(self.num_updates)}

    def stop_requested(self) -> bool:
        return bool(self.converged)

    # ---- pretrained autoencoder
    def pretrained_checkpoint(self) -> str:
        return self.cfg.pretrained

    def load_pretrained(self, model_state: dict[str, torch.Tensor]) -> None:
        prefix = "autoencoder."
        weights = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
        if not weights:
            raise ValueError("method.pretrained: the checkpoint holds no autoencoder weights (autoencoder.*)")
        self.autoencoder.load_state_dict(weights)

    # ---- training
    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                      progress: Progress) -> dict[str, torch.Tensor]:
        x = self.scale_inputs(views[0])
        if self.stage.startswith("layer"):
            loss = self.autoencoder.layerwise_loss(x, int(self.stage[len("layer"):]) - 1,
                                                   dropout=self.cfg.layerwise_dropout)
            return {"loss": loss, "reconstruction": loss.detach()}
        if self.stage == self.CLUSTER:
            return self.clustering_step(x, indices)
        dropout = self.cfg.pretrain_input_dropout
        corrupted = F.dropout(x, dropout, self.training) if dropout > 0 else x
        loss = reconstruction_loss(self.autoencoder.decode(self.autoencoder.encode(corrupted)), x)
        return {"loss": loss, "reconstruction": loss.detach()}

    def clustering_step(self, x: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        q = soft_assignment(self.autoencoder.encode(x), self.centroids, alpha=self.cfg.alpha)
        loss = kl_clustering_loss(self.target[indices], q)
        return {"loss": loss, "kl": loss.detach()}

    def scale_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The autoencoder's input (and reconstruction target): images (B, ...) x `input_scale`."""
        return images if self.cfg.input_scale == 1.0 else images * self.cfg.input_scale

    # ---- read-outs
    def eval_features(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        if kind in ("embedding", "backbone"):
            return self.autoencoder.encode(self.scale_inputs(images))
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {DECConfig.eval_feature_choices()}")

    @torch.no_grad()
    def predict_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return soft_assignment(features.to(self.centroids), self.centroids, alpha=self.cfg.alpha).argmax(dim=1)
