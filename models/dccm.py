"""DCCM (Wu et al., ICCV 2019): Deep Comprehensive Correlation Mining, as the paper defines it.

DCCM's CNN (`model.backbone: dccm_cnn`, batch norm without running statistics) -> head 256 -> 64 ->
ReLU -> K -> batch norm, softmax; the read-out is the head's argmax. Targets come from the predictions
of clean images without gradient: DCCM takes 1,000 images, predicts them, and trains 10 reshuffled
passes of batches of 32 over two augmented copies of them (about 620 steps) before taking the next
1,000. Here the clean predictions of the whole training set (dataset order, gathered across ranks) are
refreshed every `refresh_steps` steps of the same length (the trainer's step-level refresh), and each
step reads its batch's rows: the pseudo-graph W (cosine >= `graph_threshold`), the labels (argmax) and
which labels are trusted (max >= `label_threshold`). One augmented view per step (DCCM's two copies
are two steps). On the 5,000 digits, whole-set refreshes learned as fast as DCCM's chunks at equal steps
(NMI 0.48 after 1,900 steps against 0.49 after 2,500).

Batch norm normalises with each batch in evaluation too, so the whole-set passes (refresh, read-out)
visit the images in a seeded random order in near-equal batches (`batch_statistics_in_eval`), as DCCM's
shuffled 1,000-image batches do: in dataset order a class-sorted set gives one-class batches, whose
normalisation erases the classes.

Loss = graph BCE + `label_weight` * pseudo-label BCE + `local_weight` * local mutual information
(Deep InfoMax's Jensen-Shannon estimator): a critic (three bias-free 1x1 convolutions on the first
pooled map of image j concatenated with the pre-norm logits of image i, tiled) scores each image's code
against its own map and a graph-linked image's map (positives) and against two unlinked images' maps
(negatives), drawn at random in the rank's batch. The graph and label terms run over the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from losses.dccm import graph_loss, jsd_mutual_information_loss, pseudo_graph, pseudo_label_loss
from models.backbones import build_backbone
from models.base import DataInfo, Method, MethodConfig, Progress, register_method
from utils import distributed as du
from utils.config import ConfigError


@dataclass(kw_only=True)
class DCCMConfig(MethodConfig):
    name: str = "dccm"
    head_hidden_dim: int = 64
    critic_hidden_dim: int = 512
    graph_threshold: float = 0.95     # cosine of two clean predictions that links the images
    label_threshold: float = 0.9      # a clean prediction's max probability that makes its argmax a label
    label_weight: float = 5.0
    local_weight: float = 0.05
    refresh_steps: int = 620          # steps between two whole-dataset predictions (DCCM: 1,000 images x 10 x 2 / 32)

    @classmethod
    def eval_feature_choices(cls) -> tuple[str, ...]:
        return ("backbone", "cluster")

    def validate(self) -> None:
        for key in ("head_hidden_dim", "critic_hidden_dim", "refresh_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key}: expected a value >= 1, got {getattr(self, key)}")
        for key in ("graph_threshold", "label_threshold"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"method.{key}: expected a value in (0, 1], got {getattr(self, key)}")
        for key in ("label_weight", "local_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key}: expected a value >= 0, got {getattr(self, key)}")


class LocalCritic(nn.Module):
    """Scores (B, H, W) of pairs (local map (B, C, H, W), code (B, K)) row by row: three bias-free 1x1
    convolutions on the map concatenated with the code tiled over it (the first one applied to the two
    parts apart), ReLU between them."""

    def __init__(self, local_channels: int, code_dim: int, hidden: int):
        super().__init__()
        self.local_in = nn.Conv2d(local_channels, hidden, 1, bias=False)
        self.code_in = nn.Linear(code_dim, hidden, bias=False)
        self.rest = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, hidden, 1, bias=False), nn.ReLU(),
                                  nn.Conv2d(hidden, 1, 1, bias=False))

    def forward(self, local: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return self.rest(self.local_in(local) + self.code_in(code)[:, :, None, None]).squeeze(1)


def critic_partners(graph: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The critic's pairs from a batch's pseudo-graph (B, B) 0/1 (torch's global RNG):
    (linked (B,): for each image another linked one drawn uniformly, or itself when it has none;
    rows (R,): the images that have an unlinked one; unlinked (R, 2): two drawn uniformly, with replacement)."""
    others = graph * (1.0 - torch.eye(graph.shape[0], device=graph.device, dtype=graph.dtype))
    linked = torch.arange(graph.shape[0], device=graph.device)
    has_linked = (others.sum(dim=1) > 0).nonzero().flatten()
    if has_linked.numel():
        linked[has_linked] = torch.multinomial(others[has_linked], 1).flatten()
    candidates = 1.0 - graph
    rows = (candidates.sum(dim=1) > 0).nonzero().flatten()
    unlinked = (torch.multinomial(candidates[rows], 2, replacement=True) if rows.numel()
                else rows.new_zeros((0, 2)))
    return linked, rows, unlinked


@register_method("dccm")
class DCCM(Method):
    config_class: ClassVar[type[MethodConfig]] = DCCMConfig
    num_views: ClassVar[int] = 1
    has_head: ClassVar[bool] = True
    head_feature_kind: ClassVar[str | None] = "cluster"
    refresh_feature_kind: ClassVar[str] = "cluster"
    per_sample_buffers: ClassVar[tuple[str, ...]] = ("clean_predictions",)
    batch_statistics_in_eval: ClassVar[bool] = True

    def __init__(self, cfg: DCCMConfig, *, backbone: str, norm: str, data: DataInfo):
        super().__init__()
        if backbone != "dccm_cnn":
            raise ValueError(f"dccm: model.backbone must be dccm_cnn (its local map feeds the critic), "
                             f"got {backbone!r}")
        if data.num_clusters < 2:
            raise ValueError(f"DCCM needs at least 2 clusters, got num_clusters={data.num_clusters}")
        self.cfg = cfg
        self.backbone = build_backbone(backbone, in_channels=data.in_channels, image_size=data.image_size, norm=norm)

        def batch_norm(features: int) -> nn.Module:   # DCCM: every BN without running statistics
            return nn.Identity() if norm == "none" else nn.BatchNorm1d(features, track_running_stats=False)

        # Linear layers start as identities (DCCM's init: the first clusters read the first features).
        # DCCM's batch norm on the logits keeps every cluster's logit spread over the batch: without it the
        # near-uniform predictions of a fresh network link every pair (cosine >= 0.95), and the graph
        # term then puts all images in one cluster.
        self.head = nn.Sequential(nn.Linear(self.backbone.out_dim, cfg.head_hidden_dim),
                                  batch_norm(cfg.head_hidden_dim), nn.ReLU(),
                                  nn.Linear(cfg.head_hidden_dim, data.num_clusters))
        for layer in self.head:
            if isinstance(layer, nn.Linear):
                nn.init.eye_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.logit_norm = batch_norm(data.num_clusters)
        self.critic = LocalCritic(self.backbone.local_channels, data.num_clusters, cfg.critic_hidden_dim)
        # the clean predictions of the last refresh, one row per training image
        self.register_buffer("clean_predictions", torch.full((data.num_samples, data.num_clusters),
                                                             1.0 / data.num_clusters))

    # ---- the targets: the whole training set's clean predictions every refresh_steps steps
    @property
    def refresh_every_steps(self) -> int:
        return self.cfg.refresh_steps

    @torch.no_grad()
    def refresh(self, features: torch.Tensor) -> dict[str, float]:
        """features: the clean softmax predictions (N, K) of the whole training set in dataset order."""
        self.clean_predictions.copy_(features.to(self.clean_predictions))
        confident = features.max(dim=1).values >= self.cfg.label_threshold
        return {"trusted_labels": float(confident.float().mean())}

    # ---- training
    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                      progress: Progress) -> dict[str, torch.Tensor]:
        features, local = self.backbone.forward_local(views[0])
        code = self.head(features)                       # the logits before their batch norm: the critic's code
        p = F.softmax(self.logit_norm(code), dim=1)
        clean = self.clean_predictions[indices]                                         # (B, K)
        # the critic, within the rank's batch: each image's code against its own local map and a linked
        # image's (positives), and against two unlinked images' maps (negatives)
        linked, rows, unlinked = critic_partners(pseudo_graph(clean, threshold=self.cfg.graph_threshold))
        positive = self.critic(torch.cat([local, local[linked]]), torch.cat([code, code]))
        negative = self.critic(local[unlinked.flatten()], code[rows].repeat_interleave(2, dim=0))
        mutual_information = jsd_mutual_information_loss(positive, negative)
        clean = du.all_gather_no_grad(clean)
        confidence, labels = clean.max(dim=1)
        p = du.all_gather_with_grad(p)
        graph = graph_loss(p, pseudo_graph(clean, threshold=self.cfg.graph_threshold))
        label = pseudo_label_loss(p, labels, confidence >= self.cfg.label_threshold)
        loss = graph + self.cfg.label_weight * label + self.cfg.local_weight * mutual_information
        return {"loss": loss, "graph": graph.detach(), "pseudo_label": label.detach(),
                "local_mi": mutual_information.detach()}

    # ---- read-outs
    def eval_features(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "backbone":
            return self.backbone(images)
        if kind == "cluster":
            return F.softmax(self.logit_norm(self.head(self.backbone(images))), dim=1)
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {DCCMConfig.eval_feature_choices()}")

    def predict_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K) softmax rows (the "cluster" features) -> (N,) argmax cluster ids."""
        return features.argmax(dim=1)
