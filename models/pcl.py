"""PCL: Prototypical Contrastive Learning (Li, Zhou, Xiong & Hoi, ICLR 2021), on MoCo v2.

Everything of MoCo v2 (models/moco.py: key encoder, queue, shuffling BN, InfoNCE, symmetric option),
plus prototypes at several granularities refreshed by the EM loop:
- E-step (`update_from_features`, each epoch from `warmup_epochs` on, or every `cluster.every_epochs`):
  the whole training set's normalised key embeddings v' (`key_projector` features, centre-crop
  transform) are clustered once per K_m of `num_clusters_per_level` with the run's k-means; each level
  keeps its pseudo-labels, its normalised centroids c and their concentration phi
  (losses/pcl.py: mean distance to the centroid / log(Z + 10), Z <= 1 gets the maximum, clipped to the
  10th-90th percentile, rescaled to mean `temperature`). `cluster.num_clusters` is not used.
- M-step: loss = InfoNCE + proto_loss_weight x (mean over levels of ProtoNCE), where a query's
  logits are its own prototype and up to `num_negative_prototypes` prototypes that are no sample's
  positive in this rank's batch (sampled without replacement from the torch RNG, capped at what exists);
  each logit is divided by that prototype's phi. With `symmetric`, both views' queries are scored and
  averaged, as the InfoNCE.
- During the first `warmup_epochs` the loss is plain InfoNCE and no pseudo-labels are asked for.
The prototype term is per rank (each rank's batch against the shared prototypes, which every rank holds
identically); keys and queue follow MoCo. Labels, prototypes and phi are buffers, so they are checkpointed.

The paper weighs the prototype term 1; ProPos's PCL baseline weighs it 0.01 and sums rather than
averages the two symmetric directions (a factor 2 on every term that the learning rate absorbs).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from losses.pcl import proto_nce_loss, prototype_concentration, sample_negative_prototypes
from models.base import ClusterFn, DataInfo, MethodConfig, Progress, register_method
from models.moco import MoCo, MoCoConfig
from utils.config import ConfigError

log = logging.getLogger(__name__)

@dataclass(kw_only=True)
class PCLConfig(MoCoConfig):
    name: str = "pcl"
    queue_size: int = 16384            # the paper's r (ImageNet); ProPos's CIFAR baseline: 4,096
    temperature: float = 0.2           # tau of InfoNCE, and the mean of every level's phi
    # K of each granularity (the paper's ImageNet values; ProPos's CIFAR baseline: 250, 500, 1000)
    num_clusters_per_level: list[int] = field(default_factory=lambda: [25000, 50000, 100000])
    num_negative_prototypes: int = 16384   # r sampled negative prototypes per level (capped at what exists)
    proto_loss_weight: float = 1.0     # the paper: 1; ProPos's baseline: 0.01
    warmup_epochs: int = 20            # plain InfoNCE epochs before the EM loop starts

    @classmethod
    def eval_feature_choices(cls) -> tuple[str, ...]:
        return MoCoConfig.eval_feature_choices() + ("key_projector",)

    def validate(self) -> None:
        super().validate()
        if not self.num_clusters_per_level:
            raise ConfigError("method.num_clusters_per_level: expected at least one K, got []")
        if min(self.num_clusters_per_level) < 2:
            raise ConfigError(f"method.num_clusters_per_level: every K must be >= 2, "
                              f"got {self.num_clusters_per_level}")
        if self.num_negative_prototypes < 0:
            raise ConfigError(f"method.num_negative_prototypes: expected a value >= 0, "
                              f"got {self.num_negative_prototypes}")
        if self.proto_loss_weight < 0:
            raise ConfigError(f"method.proto_loss_weight: expected a value >= 0, got {self.proto_loss_weight}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"method.warmup_epochs: expected a value >= 0, got {self.warmup_epochs}")


@register_method("pcl")
class PCL(MoCo):
    config_class: ClassVar[type[MethodConfig]] = PCLConfig
    pseudo_label_feature_kind: ClassVar[str] = "key_projector"   # v': normalised key embeddings
    per_sample_buffers: ClassVar[tuple[str, ...]] = ("pseudo_labels",)

    def __init__(self, cfg: PCLConfig, *, backbone: str, norm: str, data: DataInfo):
        super().__init__(cfg, backbone=backbone, norm=norm, data=data)
        self.num_clusters_per_level = list(cfg.num_clusters_per_level)
        # EM-loop state, one row / pair of buffers per granularity m: the cluster of every dataset
        # position (-1 = not clustered yet), the normalised prototypes c (K_m, D) and their phi (K_m,).
        self.register_buffer("pseudo_labels", torch.full((len(self.num_clusters_per_level), data.num_samples), -1,
                                                         dtype=torch.long))
        for m, k in enumerate(self.num_clusters_per_level):
            self.register_buffer(f"prototypes_{m}", torch.zeros(k, cfg.feature_dim))
            self.register_buffer(f"concentration_{m}", torch.full((k,), cfg.temperature))

    def training_cluster_counts(self) -> dict[str, int]:
        return {"method.num_clusters_per_level": max(self.num_clusters_per_level)}

    def prototypes(self, level: int) -> torch.Tensor:
        return getattr(self, f"prototypes_{level}")

    def concentration(self, level: int) -> torch.Tensor:
        return getattr(self, f"concentration_{level}")

    def prototypes_active(self, epoch: int) -> bool:
        return self.cfg.proto_loss_weight > 0 and epoch >= self.cfg.warmup_epochs

    # ------------------------------------------------------------------ training
    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                      progress: Progress) -> dict[str, torch.Tensor]:
        info_nce, queries = self.contrastive_step(views)
        terms = {"info_nce": info_nce.detach()}
        loss = info_nce
        if self.prototypes_active(progress.epoch):
            labels = self.pseudo_labels[:, indices.to(self.pseudo_labels.device)]     # (M, B)
            if bool((labels < 0).any()):
                raise RuntimeError("ProtoNCE needs pseudo-labels, but some are unset: the EM loop must "
                                   "cluster before the first epoch after method.warmup_epochs")
            levels = range(len(self.num_clusters_per_level))
            negatives = [sample_negative_prototypes(labels[m], self.num_clusters_per_level[m],
                                                    self.cfg.num_negative_prototypes) for m in levels]
            prototypes = [self.prototypes(m) for m in levels]
            concentrations = [self.concentration(m) for m in levels]
            proto = sum(proto_nce_loss(q, list(labels), prototypes, concentrations, negatives)
                        for q in queries) / len(queries)
            loss = loss + self.cfg.proto_loss_weight * proto
            terms["proto_nce"] = proto.detach()
        terms["loss"] = loss
        return terms

    # ------------------------------------------------------------------ EM loop
    def wants_pseudo_labels(self, epoch: int) -> bool:
        return self.prototypes_active(epoch)

    @torch.no_grad()
    def update_from_features(self, features: torch.Tensor, cluster: ClusterFn, num_clusters: int) -> None:
        """E-step: k-means of the normalised key embeddings (N, D) at every K_m (`num_clusters` unused);
        phi is measured to the centroids as k-means returns them (the paper's code: faiss's mean of
        unit vectors; here unit centroids under the cosine metric), then the prototypes are normalised."""
        features = F.normalize(features.float(), dim=1)
        if features.shape[0] != self.pseudo_labels.shape[1]:
            raise ValueError(f"expected features of all {self.pseudo_labels.shape[1]} training images, "
                             f"got {features.shape[0]}")
        for m, k in enumerate(self.num_clusters_per_level):  # every K <= N: checked at construction
            labels, centroids = cluster(features, k)
            phi = prototype_concentration(features, labels.to(features.device), centroids.to(features),
                                          temperature=self.cfg.temperature)
            self.pseudo_labels[m].copy_(labels.to(self.pseudo_labels.device))
            self.prototypes(m).copy_(F.normalize(centroids.float(), dim=1).to(self.prototypes(m)))
            self.concentration(m).copy_(phi.to(self.concentration(m)))
            sizes = torch.bincount(labels.cpu(), minlength=k)
            log.info("PCL level %d: K=%d, cluster sizes %d-%d (%d of at most one member), phi %.4g-%.4g",
                     m, k, int(sizes.min()), int(sizes.max()), int((sizes <= 1).sum()), float(phi.min()),
                     float(phi.max()))

    # ------------------------------------------------------------------ evaluation
    def eval_features(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "key_projector":  # v', what the EM loop clusters
            return F.normalize(self.key_projector(self.key_backbone(images)), dim=1)
        if kind in MoCoConfig.eval_feature_choices():
            return super().eval_features(images, kind)
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {PCLConfig.eval_feature_choices()}")
