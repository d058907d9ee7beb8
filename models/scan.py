"""SCAN (Van Gansbeke et al., ECCV 2020): pretext features, mined neighbours, then a clustering head
trained so that each image and its neighbours fall in the same cluster.

Stages of one run (the trainer's stages; each resumable, each with its own optimizer):
1. `pretext`: SimCLR (NT-Xent between two views, SCAN's settings: tau 0.1, anchors from the first
   view only) with the `optim` section. `pretrained: PATH` skips it and starts from the backbone and
   projector of an earlier simclr or scan run (SCAN's recipe: 500 pretext epochs at batch 512, then the
   clustering step at batch 128, so two runs);
2. `scan`: when it starts, the `num_neighbours` most cosine-similar images of every image are mined
   from the whole training set's `mining_features` (exact search; the projector's normalised output,
   as SCAN's code) and kept with the image itself as candidates. Every step the loader's second view
   is a candidate drawn uniformly (`training_partners`), and each of `num_heads` linear heads on the
   backbone minimises -mean log <p(x), p(n)> - `entropy_weight` H(mean p(x)) (losses/scan.py); the
   heads' losses are summed. Adam 1e-4, wd 1e-4, constant lr, by default.
3. `selflabel` (when `selflabel_epochs` > 0): the selected head and the backbone are fine-tuned on their
   own confident predictions. The first view is the evaluation transform of the image (no
   augmentation), the second is augmented; rows whose clean-view probability exceeds
   `selflabel_threshold` (0.99) are targets for the augmented view, in a cross-entropy that weights
   each class n / n_c over the batch's n confident rows (`selflabel_class_balance`). SCAN: Adam 1e-4,
   200 epochs on CIFAR at batch 1000 (here the run's batch); it may lower results (SCAN issue #69) and
   collapses at K = 100.
With several heads, the one with the lowest SCAN loss on the whole training set (clean images, every
mined pair) is selected before each read-out of the scan stage (each evaluation, the stage's last
included), for the weights read out, label-free as SCAN selects it after each epoch on its validation
split; its argmax is the read-out, and self-labelling trains the head selected at the scan stage's
end. Before the scan stage, read-outs are k-means of backbone features. Both views of the scan stage
use the config's `augment` section (SCAN's strong views: `augment.strong_ops=4`, `augment.cutout_size`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from losses.scan import confidence_cross_entropy, scan_loss, scan_loss_over_pairs
from models.backbones import build_backbone
from models.base import DataInfo, Method, MethodConfig, Progress, Stage, StageContext, register_method
from models.simclr import projection_head, simclr_terms
from utils import distributed as du
from utils.config import ConfigError, check_momentum
from utils.evaluation import nearest_neighbours
from utils.optim import OPTIMIZERS

log = logging.getLogger(__name__)

MINING_FEATURES = ("projector", "backbone")


@dataclass(kw_only=True)
class SCANConfig(MethodConfig):
    name: str = "scan"
    # ---- pretext: SimCLR (skipped when `pretrained` is set)
    projector_hidden_dim: int = 512
    feature_dim: int = 128
    projector_bn: bool = False         # SCAN's head has no BN
    temperature: float = 0.1
    symmetric: bool = False            # SCAN's code: only the first view's rows are anchors
    pretext_epochs: int = 500          # with the `optim` section
    pretrained: str = ""               # checkpoint of a simclr or scan run: its backbone and projector
    # ---- mining
    num_neighbours: int = 20           # per image, besides itself
    mining_features: str = "projector"   # projector (SCAN) | backbone (NNM)
    # ---- clustering
    num_heads: int = 1
    entropy_weight: float = 5.0        # every SCAN config (the class default is 2.0)
    scan_epochs: int = 50
    scan_optimizer: str = "adam"
    scan_lr: float = 1.0e-4
    scan_weight_decay: float = 1.0e-4
    scan_momentum: float = 0.9
    update_backbone: bool = True       # false: only the heads train, the backbone frozen in eval mode (ImageNet)
    # ---- self-labelling (0 epochs = none)
    selflabel_epochs: int = 0
    selflabel_threshold: float = 0.99  # a clean view's max probability above this makes it a target
    selflabel_class_balance: bool = True   # weight classes n / n_c over the batch's confident rows
    selflabel_optimizer: str = "adam"
    selflabel_lr: float = 1.0e-4
    selflabel_weight_decay: float = 1.0e-4
    selflabel_momentum: float = 0.9

    @classmethod
    def eval_feature_choices(cls) -> tuple[str, ...]:
        return ("backbone", "projector", "cluster")

    def validate(self) -> None:
        def fail(key: str, message: str) -> None:
            raise ConfigError(f"method.{key}: {message}")

        if self.temperature <= 0:
            fail("temperature", f"expected a value > 0, got {self.temperature}")
        for key in ("projector_hidden_dim", "feature_dim", "num_neighbours", "num_heads", "scan_epochs"):
            if getattr(self, key) < 1:
                fail(key, f"expected a value >= 1, got {getattr(self, key)}")
        if not self.pretrained and self.pretext_epochs < 1:
            fail("pretext_epochs", f"expected >= 1 (or set method.pretrained), got {self.pretext_epochs}")
        if self.mining_features not in MINING_FEATURES:
            fail("mining_features", f"expected one of {', '.join(MINING_FEATURES)}, got {self.mining_features!r}")
        for key in ("scan_optimizer", "selflabel_optimizer"):
            if getattr(self, key) not in OPTIMIZERS:
                fail(key, f"expected one of {', '.join(OPTIMIZERS)}, got {getattr(self, key)!r}")
        for key in ("scan_lr", "selflabel_lr"):
            if getattr(self, key) <= 0:
                fail(key, f"expected a value > 0, got {getattr(self, key)}")
        for key in ("entropy_weight", "scan_weight_decay", "selflabel_weight_decay", "selflabel_epochs"):
            if getattr(self, key) < 0:
                fail(key, f"expected a value >= 0, got {getattr(self, key)}")
        for key in ("scan_momentum", "selflabel_momentum"):
            check_momentum(f"method.{key}", getattr(self, key))
        if not 0.0 < self.selflabel_threshold < 1.0:
            fail("selflabel_threshold", f"expected a probability in (0, 1), got {self.selflabel_threshold}")


@register_method("scan")
class SCAN(Method):
    config_class: ClassVar[type[MethodConfig]] = SCANConfig
    default_eval_features: ClassVar[str] = "backbone"   # k-means read-outs (before the scan stage)
    head_feature_kind: ClassVar[str | None] = "cluster"
    readout_selection_feature_kind: ClassVar[str] = "backbone"   # the heads' input: selection scores them
    per_sample_buffers: ClassVar[tuple[str, ...]] = ("neighbours",)
    PRETEXT: ClassVar[str] = "pretext"
    SCAN: ClassVar[str] = "scan"
    SELFLABEL: ClassVar[str] = "selflabel"

    def __init__(self, cfg: SCANConfig, *, backbone: str, norm: str, data: DataInfo):
        super().__init__()
        if data.num_clusters < 2:
            raise ValueError(f"SCAN needs at least 2 clusters, got num_clusters={data.num_clusters}")
        self.cfg = cfg
        self.backbone = build_backbone(backbone, in_channels=data.in_channels, image_size=data.image_size, norm=norm)
        self.projector = projection_head(self.backbone.out_dim, cfg.projector_hidden_dim, cfg.feature_dim,
                                         bn=cfg.projector_bn, norm=norm)
        self.heads = nn.ModuleList(nn.Linear(self.backbone.out_dim, data.num_clusters) for _ in range(cfg.num_heads))
        # Column 0: the image itself; then its mined neighbours, most similar first.
        self.register_buffer("neighbours", torch.zeros(data.num_samples, cfg.num_neighbours + 1, dtype=torch.long))
        self.register_buffer("neighbours_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("head_index", torch.zeros((), dtype=torch.long))
        self.register_buffer("head_losses", torch.zeros(cfg.num_heads, dtype=torch.float64))
        self.register_buffer("head_selected", torch.zeros((), dtype=torch.bool))   # by a read-out of this stage
        self.stage = ""

    # ---- stages
    def training_stages(self) -> list[Stage]:
        c = self.cfg
        stages = [] if c.pretrained else [Stage(name=self.PRETEXT, epochs=c.pretext_epochs)]
        stages.append(Stage(name=self.SCAN, epochs=c.scan_epochs, optimizer=c.scan_optimizer, lr=c.scan_lr,
                            weight_decay=c.scan_weight_decay, momentum=c.scan_momentum, schedule="constant",
                            warmup_epochs=0.0))
        if c.selflabel_epochs:
            stages.append(Stage(name=self.SELFLABEL, epochs=c.selflabel_epochs, optimizer=c.selflabel_optimizer,
                                lr=c.selflabel_lr, weight_decay=c.selflabel_weight_decay,
                                momentum=c.selflabel_momentum, schedule="constant", warmup_epochs=0.0))
        return stages

    def enter_stage(self, name: str) -> None:
        self.stage = name
        if name == self.PRETEXT:
            trainable = [*self.backbone.parameters(), *self.projector.parameters()]
        elif name == self.SELFLABEL:   # the selected head (as of the scan stage's last read-out) and the backbone
            trainable = [*self.backbone.parameters(), *self.heads[int(self.head_index)].parameters()]
        else:
            trainable = [*self.heads.parameters(), *(self.backbone.parameters() if self.cfg.update_backbone else [])]
        chosen = {id(p) for p in trainable}
        for p in self.parameters():
            p.requires_grad_(id(p) in chosen)

    def train(self, mode: bool = True) -> SCAN:
        super().train(mode)
        if self.stage == self.SCAN and not self.cfg.update_backbone:
            self.backbone.eval()   # frozen: its batch-norm statistics stay those of the pretext
        return self

    @torch.no_grad()
    def start_stage(self, name: str, context: StageContext) -> None:
        if name != self.SCAN:
            return
        features = context.features(self.cfg.mining_features)
        n, k = features.shape[0], self.cfg.num_neighbours
        if k >= n:
            raise ValueError(f"method.num_neighbours: {k} neighbours per image need more than {k} images, "
                             f"the training set has {n}")
        mined = nearest_neighbours(features, k)
        self.neighbours.copy_(torch.cat([torch.arange(n, device=mined.device).unsqueeze(1), mined], dim=1))
        self.neighbours_ready.fill_(True)
        log.info("mined the %d nearest neighbours of %d images (%s features)", k, n, self.cfg.mining_features)
        self.head_index.zero_()
        self.head_selected.fill_(False)

    @property
    def has_head(self) -> bool:  # the selected head's argmax once the scan stage has begun; k-means before
        return bool(self.neighbours_ready)

    def mined_neighbours(self) -> torch.Tensor | None:
        partners = self.training_partners()   # the mined table, self in column 0
        return None if partners is None else partners[:, 1:]

    def training_partners(self) -> torch.Tensor | None:
        return self.neighbours if self.stage == self.SCAN and bool(self.neighbours_ready) else None

    def clean_training_views(self) -> tuple[int, ...]:
        return (0,) if self.stage == self.SELFLABEL else ()   # self-labelling: targets from the clean view

    # ---- head selection (before each read-out of the scan stage, several heads only)
    def selects_readout(self) -> bool:
        return self.stage == self.SCAN and self.cfg.num_heads > 1 and bool(self.neighbours_ready)

    @torch.no_grad()
    def select_readout(self, features: torch.Tensor) -> None:
        """features: the whole training set's backbone features (N, D) in dataset order."""
        self.select_head(self.head_probabilities(features))

    @torch.no_grad()
    def head_probabilities(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features (N, D) -> each head's softmax rows (N, K)."""
        features = features.to(self.heads[0].weight)
        return [F.softmax(head(features), dim=1) for head in self.heads]

    def select_head(self, probabilities: list[torch.Tensor]) -> None:
        """Make the read-out the head whose probabilities (N, K) of the whole training set have the lowest
        SCAN loss over every mined pair."""
        losses = [scan_loss_over_pairs(p, self.neighbours[:, 1:], entropy_weight=self.cfg.entropy_weight)
                  for p in probabilities]
        self.head_losses.copy_(torch.tensor(losses, dtype=torch.float64))
        self.head_index.fill_(int(self.head_losses.argmin()))
        self.head_selected.fill_(True)
        log.info("scan heads: loss on the training set %s -> head %d", " ".join(f"{v:.4f}" for v in losses),
                 int(self.head_index))

    # ---- pretrained pretext
    def pretrained_checkpoint(self) -> str:
        return self.cfg.pretrained

    def load_pretrained(self, model_state: dict[str, torch.Tensor]) -> None:
        for part in ("backbone", "projector"):
            prefix = part + "."
            weights = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
            if not weights:
                raise ValueError(f"method.pretrained: the checkpoint holds no {part} weights ({prefix}*); "
                                 "expected a simclr or scan run")
            getattr(self, part).load_state_dict(weights)

    # ---- training
    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                      progress: Progress) -> dict[str, torch.Tensor]:
        if self.stage == self.SCAN:
            return self.clustering_step(views, indices, progress)
        x1, x2 = views[0], views[1]
        if self.stage == self.SELFLABEL:
            return self.self_label_step(x1, x2)
        return simclr_terms(self.backbone, self.projector, x1, x2, temperature=self.cfg.temperature,
                            symmetric=self.cfg.symmetric)

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) for the clustering stage: without gradient when the backbone is frozen."""
        with torch.set_grad_enabled(self.cfg.update_backbone and torch.is_grad_enabled()):
            return self.backbone(images)

    def clustering_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                        progress: Progress) -> dict[str, torch.Tensor]:
        """views: the images (B, C, H, W) and one listed neighbour of each, augmented."""
        anchors, neighbours = views[0], views[1]
        h = self.backbone_features(torch.cat([anchors, neighbours]))
        loss = consistency = entropy = h.new_zeros(())
        for head in self.heads:
            p_anchor, p_neighbour = F.softmax(head(h), dim=1).chunk(2)
            total, head_consistency, head_entropy = scan_loss(
                du.all_gather_with_grad(p_anchor), du.all_gather_with_grad(p_neighbour),
                entropy_weight=self.cfg.entropy_weight)
            loss = loss + total
            consistency = consistency + head_consistency.detach() / len(self.heads)
            entropy = entropy + head_entropy.detach() / len(self.heads)
        return {"loss": loss, "consistency": consistency, "entropy": entropy}

    def self_label_step(self, clean: torch.Tensor, augmented: torch.Tensor) -> dict[str, torch.Tensor]:
        """clean, augmented (B, C, H, W): the evaluation transform and an augmented view of the same images.
        One forward of both (batch-norm statistics over the 2B images); the clean half gives the targets."""
        logits = self.heads[int(self.head_index)](self.backbone(torch.cat([clean, augmented])))
        clean_logits, augmented_logits = logits.chunk(2)
        weak = du.all_gather_no_grad(F.softmax(clean_logits.detach(), dim=1))
        loss, confident = confidence_cross_entropy(weak, du.all_gather_with_grad(augmented_logits),
                                                   threshold=self.cfg.selflabel_threshold,
                                                   class_balance=self.cfg.selflabel_class_balance)
        return {"loss": loss, "self_label_ce": loss.detach(), "confident": confident.detach()}

    # ---- read-outs
    def eval_features(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "backbone":
            return self.backbone(images)
        if kind == "projector":
            return F.normalize(self.projector(self.backbone(images)), dim=1)
        if kind == "cluster":
            return F.softmax(self.heads[int(self.head_index)](self.backbone(images)), dim=1)
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {SCANConfig.eval_feature_choices()}")

    def predict_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K) softmax rows of the selected head (the "cluster" features) -> (N,) argmax cluster ids."""
        return features.argmax(dim=1)
