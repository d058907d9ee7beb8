"""The shared base of every method, and the registry that names them.

A method owns its modules (backbone, heads, EMA target, prototypes, queues) and implements a few
hooks; the trainer (utils/trainer.py) calls only these and never asks which method it runs:

- `training_step(views, indices, progress) -> {"loss": ..., other named terms}` (also `forward`,
  so DistributedDataParallel can wrap the method and synchronise its gradients);
- `training_partners()`: a table of candidate rows per image from which the loader draws what the
  odd-numbered views show (SCAN's mined neighbours); None (the default) = every view shows the image;
  and `clean_training_views()`, the views left un-augmented (SCAN's self-labelling targets);
- `training_views()`: how many of the `num_views` views the next epoch's steps get (the loader makes
  only those; NNM needs its third view in the clustering stage only);
- `parameter_groups()` (per-group `lr_scale`, e.g. ProPos's 10x predictor), and
  `parameters_left_alone()`, those the last step did not train (their gradients are dropped);
- `after_optimizer_step(progress)` (momentum/EMA updates, queues);
- the EM loop: `wants_pseudo_labels(epoch)`, then `update_from_features(features, cluster, K)` with
  the whole dataset's features named `pseudo_label_feature_kind`; by default that is one k-means
  and `set_pseudo_labels(labels, centroids)` (PCL overrides it to cluster at several granularities);
- evaluation: `eval_features(images, kind)` for k-means read-outs; methods with a clustering head
  set `has_head`, name `head_feature_kind` and implement `predict_from_features(features)`, so the
  read-out reuses the (cached) whole-dataset pass of those features; when `selects_readout()`, each
  evaluation of a training run first hands `select_readout(features)` the whole training set's
  `readout_selection_feature_kind` features (SCAN: which of its heads is read out);
- stages (optional): `training_stages()` lists named stages, each with its own epochs and optimizer
  settings (e.g. DEC: layer-wise pretraining, fine-tuning, clustering); the trainer calls
  `enter_stage(name)` whenever a stage becomes current (fresh or resumed: which parameters train, what
  `training_step` computes) and `start_stage(name, context)` once when it starts fresh (e.g. k-means
  initialisation of centroids on the whole dataset's features). No stages: one stage named "train"
  from the `train` and `optim` sections, as before;
- step-level refresh (optional): every `refresh_every_steps` steps of a stage the trainer hands
  `refresh(features)` the whole dataset's features named `refresh_feature_kind` (gathered across
  ranks, N rows in dataset order; DEC's target distribution), and ends the stage when
  `stop_requested()` (DEC's tol rule);
- `pretrained_checkpoint()` / `load_pretrained(model_state)`: weights of an earlier run loaded before
  a fresh run starts (DEC and IDEC share one autoencoder pretraining).
Method state that must survive a restart (prototypes, pseudo-labels, queues) lives in registered
buffers, so `state_dict()` is the checkpoint's method state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from utils.registry import Registry


@dataclass(kw_only=True)
class MethodConfig:
    """Options common to every method; each method subclasses this with its own fields."""
    name: str

    @classmethod
    def eval_feature_choices(cls) -> tuple[str, ...]:
        return ("backbone",)

    @classmethod
    def backbone_registry(cls) -> Registry:
        """The registry whose entry `model.backbone` names, checked when the config is read."""
        from models.backbones import BACKBONES

        return BACKBONES

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about its data to build itself."""
    in_channels: int
    image_size: int
    num_classes: int
    num_samples: int       # N of the training set (pseudo-labels are indexed by dataset position)
    num_clusters: int      # K of the EM loop's k-means
    # The last rows of the training set that only train, outside the set clustered and scored
    # (STL-10's unlabeled images with data.stl10_unlabeled); 0 otherwise.
    num_extra_rows: int = 0


@dataclass(frozen=True)
class Progress:
    """Where training is; methods derive schedules (warm-up, momentum) from it. `total_steps` is the
    global step at which the current stage ends (the whole run for single-stage methods)."""
    epoch: int
    global_step: int
    steps_per_epoch: int
    total_steps: int
    stage: str = "train"
    stage_step: int = 0     # steps done in the current stage

    @property
    def fraction(self) -> float:
        return min(1.0, self.global_step / max(1, self.total_steps))


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One training stage: its epochs and optimizer settings; None = the `optim` section's value.
    `lr` is the base lr for a global batch of `optim.lr_reference_batch`, scaled like `optim.lr`."""
    name: str
    epochs: int
    optimizer: str | None = None        # sgd | adam | adamw
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    schedule: str | None = None         # cosine | constant | step
    warmup_epochs: float | None = None
    lr_step_every: int = 0              # schedule "step": lr x lr_step_factor every this many iterations
    lr_step_factor: float = 0.1


@dataclass(frozen=True)
class StageContext:
    """What `start_stage` may use: the whole training set's features of a kind (N rows in dataset
    order, identical on every rank), k-means as the `cluster` section sets it, and K."""
    features: Callable[[str], torch.Tensor]
    cluster: "ClusterFn"
    num_clusters: int


class Method(nn.Module):
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    num_views: ClassVar[int] = 2
    default_eval_features: ClassVar[str] = "backbone"
    pseudo_label_feature_kind: ClassVar[str] = "backbone"   # what the EM loop clusters (an eval_features kind)
    has_head: ClassVar[bool] = False                          # read out clusters from the head, not k-means
    head_feature_kind: ClassVar[str | None] = None            # the features the head's read-out takes
    readout_selection_feature_kind: ClassVar[str] = "backbone"   # what select_readout() receives
    refresh_feature_kind: ClassVar[str] = "backbone"          # what refresh() receives
    # Batch norm that normalises with each batch in evaluation too (DCCM, no running statistics): the
    # whole-set passes then visit the images in a seeded random order (`extract_features`' shuffle_seed).
    batch_statistics_in_eval: ClassVar[bool] = False
    # Buffers with a row per training image (pseudo-labels, DEC's targets): training state that the
    # read-out never uses, left out when a checkpoint is evaluated on other data (another N).
    per_sample_buffers: ClassVar[tuple[str, ...]] = ()
    # Train on the extra rows (`DataInfo.num_extra_rows`) apart: each epoch visits them first, then the
    # clustered rows, in whole global batches (the loader's phases), so a step sees one kind only.
    extra_rows_apart: ClassVar[bool] = False

    def training_cluster_counts(self) -> dict[str, int]:
        """{config key: K} of the clusterings of the training images that the method runs besides
        `cluster.num_clusters` (PCL's levels): training refuses fewer images than K before it starts.
        Evaluating the weights does not need them."""
        return {}

    def check_batch(self, *, batch_size_per_rank: int, world_size: int) -> None:
        """Raise a one-line ValueError if the method cannot train with this batch (MoCo: more keys per
        step than its queue holds); the Trainer asks before training starts, not at the first step."""

    def forward(self, views: list[torch.Tensor], indices: torch.Tensor, progress: Progress) -> dict[str, torch.Tensor]:
        return self.training_step(views, indices, progress)

    def training_step(self, views: list[torch.Tensor], indices: torch.Tensor,
                      progress: Progress) -> dict[str, torch.Tensor]:
        """views: `training_views()` tensors (B, C, H, W); indices (B,) dataset positions.
        Returns named scalar terms; "loss" is the one to minimise."""
        raise NotImplementedError

    def parameters_left_alone(self) -> list[nn.Parameter]:
        """Asked after each step's backward pass: parameters that the step's loss reached only through a
        zero-weighted term (kept so that DistributedDataParallel sees every parameter used). The trainer
        drops their gradients, so the optimiser skips them and their state, as if the step had not used
        them (CC's cluster head in an instance-only step)."""
        return []

    def parameter_groups(self) -> list[dict]:
        """Optimizer groups; each may carry `lr_scale` (x base lr) and `weight_decay`."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def after_optimizer_step(self, progress: Progress) -> None:
        pass

    def training_partners(self) -> torch.Tensor | None:
        """(N, M) int64 rows, or None: asked before each epoch; with a table, the loader makes every
        odd-numbered view of image i from one of the M rows of table[i], drawn uniformly (SCAN: view 1
        is a mined neighbour, or the image itself)."""
        return None

    def mined_neighbours(self) -> torch.Tensor | None:
        """(N, k) rows of each training image's neighbours (itself excluded) mined for the current stage, or
        None; when a stage starts the trainer logs how many pairs share a class (SCAN's mining check)."""
        return None

    def training_views(self) -> int:
        """Asked before each epoch: the number of views (the first ones, 1..num_views) that the loader
        makes for the epoch's steps; views a stage does not use are never augmented."""
        return self.num_views

    def clean_training_views(self) -> tuple[int, ...]:
        """Asked before each epoch: the views (by number) that the loader makes with the evaluation
        transform instead of augmenting them (SCAN's self-labelling: view 0)."""
        return ()

    # ---- EM loop
    def wants_pseudo_labels(self, epoch: int) -> bool:
        return False

    def has_pseudo_labels(self) -> bool:
        """Whether the EM loop's state is set (from an E-step or a checkpoint); while it is not, every
        epoch starts with an E-step. Default: a `pseudo_labels` buffer with no -1 left."""
        labels = getattr(self, "pseudo_labels", None)
        return labels is not None and bool((labels >= 0).all())

    def update_from_features(self, features: torch.Tensor, cluster: ClusterFn, num_clusters: int) -> None:
        """E-step on the whole training set's features (N, D), identical on every rank."""
        labels, centroids = cluster(features, num_clusters)
        self.set_pseudo_labels(labels, centroids)

    def set_pseudo_labels(self, labels: torch.Tensor, centroids: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not use pseudo-labels")

    # ---- stages, step-level refresh, early stop, pretrained weights
    def training_stages(self) -> list[Stage]:
        """The run's stages in order; [] = one stage "train" from the `train` and `optim` sections."""
        return []

    def enter_stage(self, name: str) -> None:
        """`name` is now the current stage (at its start and when resuming inside it)."""

    def start_stage(self, name: str, context: StageContext) -> None:
        """One-time work when stage `name` starts fresh (not when resuming inside it)."""

    @property
    def refresh_every_steps(self) -> int:
        """Call `refresh` every this many steps of the current stage (at its steps 0, n, 2n...); 0 = never."""
        return 0

    def refresh(self, features: torch.Tensor) -> dict[str, float]:
        """Step-level refresh from the whole training set's features (N, D); returns stats to log."""
        return {}

    def stop_requested(self) -> bool:
        """True ends the current stage early (checked after each refresh)."""
        return False

    def pretrained_checkpoint(self) -> str:
        """Path of an earlier run's checkpoint whose weights a fresh run starts from; "" = none."""
        return ""

    def load_pretrained(self, model_state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not load pretrained weights")

    # ---- evaluation
    def predict_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features of `head_feature_kind` -> (N,) cluster ids."""
        raise NotImplementedError(f"{type(self).__name__} has no feature read-out")

    def selects_readout(self) -> bool:
        """Asked before each evaluation of a training run: whether `select_readout` chooses the read-out
        first, for the weights being evaluated."""
        return False

    def select_readout(self, features: torch.Tensor) -> None:
        """features: the whole training set's `readout_selection_feature_kind` features (N, D) in dataset
        order, from the weights the evaluation that follows reads out."""
        raise NotImplementedError(f"{type(self).__name__} has no read-out to select")

    def eval_features(self, images: torch.Tensor, kind: str) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) features named `kind` (one of config_class.eval_feature_choices())."""
        raise NotImplementedError

    def head_predictions(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B,) cluster ids, for methods with `has_head`."""
        if self.head_feature_kind is None:
            raise NotImplementedError(f"{type(self).__name__} has no clustering head")
        return self.predict_from_features(self.eval_features(images, self.head_feature_kind))


@torch.no_grad()
def ema_update_(target: list[torch.Tensor], online: list[torch.Tensor], momentum: float) -> None:
    """In place, pairwise: target <- momentum * target + (1 - momentum) * online (BYOL/ProPos targets,
    MoCo's key encoder). Both lists hold matching tensors in the same order."""
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, online, alpha=1.0 - momentum)


ClusterFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""k-means as the config sets it: (features (N, D), K) -> (labels (N,), centroids (K, D)), same on every rank."""


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Class decorator: register a Method subclass under `name` (its config's `name` default)."""
    def decorator(cls: type[Method]) -> type[Method]:
        METHODS.register(name)(cls)
        return cls
    return decorator
