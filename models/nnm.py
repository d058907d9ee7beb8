"""NNM (Dang et al., CVPR 2021): Nearest Neighbour Matching, SCAN's clustering step with neighbours at
two scales. Built on SCAN (models/scan.py): the same pretext stage (or `pretrained`), mining (by
default on the backbone's features, as NNM), heads, head selection, read-out and options.

In the `scan` stage each step has three views: an anchor a, one of its listed neighbours n, and a second
view a' of the anchor (the loader's partner views are the odd-numbered ones). With P = [p(a); p(a')] and
Q = [p(n); p(a_j)], a_j the anchor of the global batch nearest to a (L2 on backbone features), each head
minimises (losses/nnm.py) the local pair consistency of P and Q and a contrast between their cluster
columns, the same two terms between [P; Q] and a bank, and -`entropy_weight` H(mean row of P). The bank
holds, per head, the assignment of every image's nearest other image in the whole training set
(cosine, backbone features); it is rebuilt at each `cluster.every_epochs` E-step of the stage from a
clean pass in dataset order (NNM's code filled it from its shuffled, augmented loader by dataset index,
so that targets belonged to other images), and its terms count from the stage's second epoch on, as
NNM uses it from epoch 2. The other stages (pretext, self-labelling) take SCAN's two views, so the loader
makes the third only in the `scan` stage (`training_views`). NNM selects heads by the
lowest loss on its test split; here by SCAN's loss on the whole training set, as for SCAN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from losses.nnm import nnm_loss
from models.base import DataInfo, MethodConfig, Progress, register_method
from models.scan import SCAN, SCANConfig
from utils import distributed as du
from utils.evaluation import nearest_neighbours


@dataclass(kw_only=True)
class NNMConfig(SCANConfig):
    name: str = "nnm"
    mining_features: str = "backbone"   # NNM mines the backbone's normalised features
    num_heads: int = 3
    scan_epochs: int = 100


@register_method("nnm")
class NNM(SCAN):
    config_class: ClassVar[type[MethodConfig]] = NNMConfig
    num_views: ClassVar[int] = 3
    per_sample_buffers: ClassVar[tuple[str, ...]] = ("neighbours", "bank")

    def __init__(self, cfg: NNMConfig, *, backbone: str, norm: str, data: DataInfo):
        super().__init__(cfg, backbone=backbone, norm=norm, data=data)
        self.register_buffer("bank", torch.zeros(cfg.num_heads, data.num_samples, data.num_clusters))
        self.register_buffer("bank_ready", torch.zeros((), dtype=torch.bool))

    def start_stage(self, name, context) -> None:
        super().start_stage(name, context)
        if name == self.SCAN:
            self.bank_ready.fill_(False)

    def training_views(self) -> int:
        return 3 if self.stage == self.SCAN else 2

    # ---- the bank, at each E-step of the clustering stage (heads are selected at read-outs, as SCAN's)
    def wants_pseudo_labels(self, epoch: int) -> bool:
        return self.stage == self.SCAN

    def has_pseudo_labels(self) -> bool:
        return bool(self.bank_ready)

    @torch.no_grad()
    def update_from_features(self, features: torch.Tensor, cluster, num_clusters: int) -> None:
        """features: the whole training set's backbone features (N, D) in dataset order."""
        probabilities = self.head_probabilities(features)
        nearest = nearest_neighbours(features, 1)[:, 0]                                  # (N,)
        for h, p in enumerate(probabilities):
            self.bank[h].copy_(p[nearest])
        self.bank_ready.fill_(True)

    # ---- training
    def clustering_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                        progress: Progress) -> dict[str, torch.Tensor]:
        """views: anchors, one listed neighbour of each, and a second view of the anchors (B, C, H, W)."""
        batch = views[0].shape[0]
        h = self.backbone_features(torch.cat(views[:3]))
        anchor_features = du.all_gather_no_grad(h[:batch].detach())                    # (B_global, D)
        distances = torch.cdist(anchor_features.float(), anchor_features.float())
        distances.fill_diagonal_(float("inf"))
        batch_neighbour = distances.argmin(dim=1)                                       # (B_global,)
        # NNM uses the bank from the stage's second epoch on: it then holds the last epoch's predictions
        use_bank = bool(self.bank_ready) and progress.stage_step >= progress.steps_per_epoch
        rows = du.all_gather_no_grad(indices) if use_bank else None
        loss, logged = h.new_zeros(()), {}
        for k, head in enumerate(self.heads):
            p_anchor, p_neighbour, p_second = (du.all_gather_with_grad(p)
                                               for p in F.softmax(head(h), dim=1).chunk(3))
            terms = nnm_loss(torch.cat([p_anchor, p_second]), torch.cat([p_neighbour, p_anchor[batch_neighbour]]),
                             self.bank[k][rows] if use_bank else None, entropy_weight=self.cfg.entropy_weight)
            loss = loss + terms["loss"]
            for name, value in terms.items():
                if name != "loss":
                    logged[name] = logged.get(name, 0.0) + value.detach() / len(self.heads)
        return {"loss": loss, **logged}
