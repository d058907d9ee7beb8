"""The one training loop for every method: EM loop, optimisation, evaluation, checkpoints.

Per epoch: (E) if the method wants pseudo-labels, extract features of the whole training set on
all ranks, gather exactly N rows in dataset order, k-means them on the device, hand every rank the
same labels; (M) train the method's losses for one epoch; then evaluate (k-means or head read-out,
NMI / ACC / ARI) every `eval.every_epochs`, and save `last.pt` / `best.pt` on rank 0.

A run is a sequence of stages (`Method.training_stages()`, by default the one stage "train" of the
`train` and `optim` sections), each with its own epochs, optimizer and lr schedule. The checkpoint
records the stage, the epochs done in it and its first step, so `--resume auto` continues inside a
stage. Inside a stage the method may ask for a step-level refresh from the whole dataset's features
(`refresh_every_steps`, e.g. DEC's target distribution), evaluated and logged at each refresh, and
end the stage early (`stop_requested`, DEC's tol rule).

A stop requested mid-epoch (`fit(should_stop)`: the launcher's SIGUSR1, utils/stop.py) ends the step
in progress on every rank and saves the position inside the epoch too; so does `train.save_every_minutes`
without stopping, so that a crash or a kill loses at most that much. The resumed run continues at the
next batch with the epoch's pseudo-labels, and trains exactly as the uninterrupted run would. A stop
requested during the E-step's feature pass ends the pass at its next batch (`StopRequested`) and saves
the epoch's start, with the RNG state the E-step began with; the resumed run runs that E-step again.
So does one during the feature passes of the evaluations that end an epoch (but the run's last, which
is its result): the resumed run first runs them on the same weights, then logs and saves them (best.pt)
as the uninterrupted run did.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.datasets import (ImageAllocator, ImageData, UnreadableImageError, decode_files_into, empty_images,
                           extra_training_rows)
from models.base import ClusterFn, Method, Progress, Stage, StageContext
from utils import distributed as du
from utils.assignments import cluster_size_stats, format_cluster_sizes
from utils.checkpoint import (capture_rng_state, gather_rng_states, load_checkpoint, load_model_state, one_line,
                              restore_rng_state, save_checkpoint)
from utils.config import Config
from utils.features import assign_to_centroids, cluster_features, extract_features
from utils.logger import MetricWriter
from utils.optim import LRSchedule, build_optimizer
from utils.stop import StopRequested

log = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_num_clusters(cfg: Config, train_data: ImageData, requested: int | None = None) -> int:
    """K for `requested` (`cluster.num_clusters` when None, or `eval.num_clusters`): 0 means the training
    data's number of classes, and for unlabeled data (no classes) `cluster.num_clusters`. Unlabeled data
    without `cluster.num_clusters` are a ValueError."""
    k = (cfg.cluster.num_clusters if requested is None else requested) or train_data.num_classes \
        or cfg.cluster.num_clusters
    if k < 1:
        raise ValueError(f"cluster.num_clusters: the training data have no classes to take the number of "
                         f"clusters from ({train_data.name} is unlabeled); set cluster.num_clusters=K")
    return k


@dataclass
class FitResult:
    epochs_total: int             # the run's epochs trained, over all its processes
    metrics: dict[str, float]     # the last evaluation
    best: dict[str, float]
    seconds: float
    stopped_on_request: bool = False   # should_stop ended the run before its last epoch (last.pt resumes it)
    resumed_at: tuple[int, int] | None = None   # (epoch, step in it) this process resumed the run at; None: fresh


def check_sync_batch_device(device: torch.device, world_size: int) -> None:
    """SyncBatchNorm across ranks has CUDA kernels only (DDP refuses it on CPU modules): refuse it in
    one line that names the key, rather than torch's "only work with GPU modules". One process never
    converts, so a GPU config with model.norm=sync_batch still debugs on a CPU."""
    if device.type != "cuda":
        raise ValueError(f"model.norm: sync_batch needs CUDA, and this run's {world_size} ranks are on {device.type} "
                         "(run.device=auto found no GPU, or run.device=cpu); use model.norm=batch")


def available_memory_bytes() -> int | None:
    """The memory the kernel can give without swapping (MemAvailable in /proc/meminfo: free memory and
    reclaimable page cache), or None where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def load_once_per_node(builds: Sequence[Callable[[ImageAllocator], ImageData]]) -> list[ImageData]:
    """[build(allocate) for build in builds], for sets held in memory, each read by one rank per node
    straight into one copy that the node's ranks share (`du.node_shared_empty`), in place of a load per rank
    (and of a private copy on the loading rank as well). In turn for each set: the lowest rank of each node
    calls build(allocate); when the build asks `allocate` for the tensor of its images, which it does before
    reading any, every rank of the node maps a shared tensor of that shape, and the build reads into it. The
    others then take the set's labels, names and statistics from the loading rank. A build that gives its
    images in a tensor of its own has them copied into a shared one. A rank that cannot map its node's copy
    (no shared memory, or a /dev/shm of its own), and every rank for a set that build() gives as files, call
    build() themselves. An error a build() raises on a node's first rank is raised on every rank, as a
    ValueError with the lowest such rank's message, so no rank waits for the others. A set whose copies on a
    node (one, or one per rank where they cannot be shared) would take more than 80% of the memory available
    is such an error, raised before any image is read. In one process: the builds. Collective."""
    if du.get_world_size() == 1:
        def allocate(shape: tuple[int, int, int, int]) -> torch.Tensor:
            _refuse_images_beyond_memory(shape, ranks_on_node=1)
            return empty_images(shape)

        return [build(allocate) for build in builds]
    nodes = du.all_gather_object(du.node_name())  # once: every exchange below reuses them
    return [_load_set_once_per_node(build, nodes) for build in builds]


def _refuse_beyond_memory(doing: str, nbytes: int, ranks_on_node: int, remedy: str) -> None:
    """A one-line ValueError, "`doing` takes ... ; `remedy`", where the node's copies of `nbytes` would take
    more than 80% of the memory available: one copy, or one per rank of the node where SHARED_MEMORY_DIR has
    too little room to share it. Images too large for the machine stop the run before any is read or
    decoded, with what to set, rather than the kernel's out-of-memory killer stopping it part-way."""
    available = available_memory_bytes()
    copies = 1 if ranks_on_node == 1 or du.shared_memory_free_bytes() >= nbytes else ranks_on_node
    if available is None or nbytes * copies <= 0.8 * available:
        return
    on_node = ("one copy on this node" if copies == 1 else
               f"{nbytes * copies / 1e9:.3g} GB for the {copies} ranks on this node, a copy each: "
               f"{du.SHARED_MEMORY_DIR} has too little room to share one")
    raise ValueError(f"{doing} takes {nbytes / 1e9:.3g} GB ({on_node}), more than 80% of the "
                     f"{available / 1e9:.3g} GB of memory available; {remedy}")


def _refuse_images_beyond_memory(shape: tuple[int, int, int, int], ranks_on_node: int) -> None:
    """`_refuse_beyond_memory` for a set held in memory whose builder asks for (N, C, H, W) uint8 images."""
    _refuse_beyond_memory(f"loading {shape[0]} images of {'x'.join(map(str, shape[1:]))}", math.prod(shape),
                          ranks_on_node, "set data.limit to hold fewer images")


def _share_images_of_shape(shape: tuple[int, ...] | None, first: int,
                           nodes: list[str]) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """The node's shared tensor for the images its first rank (`first`) is about to read, and the ranks that
    share it (`du.node_shared_empty`; `nodes`: every rank's node name); None where that rank reads none.
    `shape`: the images' shape on a node's first rank when its build asks for their tensor, else None (the
    other ranks, and a first rank whose build failed or gave files). Collective: every rank calls it once
    per set."""
    shapes = du.all_gather_object(shape)
    if all(other is None for other in shapes):
        return None
    ours = shapes[first]
    tensor, sharers = du.node_shared_empty(ours or (0,), torch.uint8, nodes=nodes)  # every rank takes part
    return (tensor, sharers) if ours is not None else None


def _load_set_once_per_node(build: Callable[[ImageAllocator], ImageData], nodes: list[str]) -> ImageData:
    """One set of `load_once_per_node` (`nodes`: every rank's node name). Collective."""
    rank = du.get_rank()
    first = nodes.index(nodes[rank])  # the node's lowest rank loads
    ranks_on_node = nodes.count(nodes[rank])
    shared: tuple[torch.Tensor, tuple[int, ...]] | None = None  # the node's copy and its sharers, once known
    asked = False  # whether this rank has taken part in `_share_images_of_shape` for the set
    loaded, report = None, None  # report: the set the node's first rank loaded, without its images
    if rank == first:
        def allocate(shape: tuple[int, int, int, int]) -> torch.Tensor:
            nonlocal shared, asked
            if asked:  # a second tensor for the same set is the build's own business
                return empty_images(shape)
            # Refused before the exchange, the build fails as any build does (the exchange then follows).
            _refuse_images_beyond_memory(shape, ranks_on_node)
            asked = True
            shared = _share_images_of_shape(tuple(shape), first, nodes)
            return shared[0] if shared is not None else empty_images(shape)

        try:
            loaded = build(allocate)
            report = {**{f.name: getattr(loaded, f.name) for f in fields(loaded) if f.name != "images"},
                      "images": None if loaded.images is None else tuple(loaded.images.shape),
                      "in_shared": shared is not None and loaded.images is not None
                      and _same_tensor(loaded.images, shared[0])}
        except (OSError, ValueError, ModuleNotFoundError) as exc:
            report = str(exc)
    if not asked:
        shared = _share_images_of_shape(None, first, nodes)
    reports = du.all_gather_object(report)
    failure = next((r for r in reports if isinstance(r, str)), None)
    if failure is not None:
        du.barrier()  # every rank ends here: leaving together, none tears its group down under another's gather
        raise ValueError(failure)
    described = dict(reports[first])
    in_shared = described.pop("in_shared")
    if any(r is not None and r["images"] is not None and not r["in_shared"] for r in reports):
        # Some node's build read its images into a tensor of its own: copy them into a shared one there.
        ours = described["images"] if described["images"] is not None and not in_shared else None
        copy, sharers = du.node_shared_empty(ours or (0,), torch.uint8, nodes=nodes)
        if ours is not None:
            shared = copy, sharers
            if rank == first and len(sharers) > 1:
                copy.copy_(loaded.images)
                loaded = replace(loaded, images=copy)  # its own copy goes now, before the next set loads
        du.barrier()  # no rank reads the shared copy before it is filled
    if described["images"] is None or shared is None or first not in shared[1] or len(shared[1]) == 1:
        return loaded if loaded is not None else build(empty_images)
    images, sharers = shared
    if rank == first:
        log.info("%s: %d images (%.3g GB) loaded once for the %d ranks of this node", described["name"],
                 described["images"][0], images.numel() / 1e9, len(sharers))
        return loaded
    return ImageData(**{**described, "images": images})


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the same elements of the same memory."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def decode_once(train_data: ImageData, eval_data: ImageData, why: str, *, dist_info: du.DistInfo,
                gather_block_bytes: int = 64 << 20) -> tuple[ImageData, ImageData]:
    """(train, eval) with their image files decoded into memory once (`data.decode_once`, or
    `data.loader=device`, which trains on that copy): every feature pass (k-means, evaluation, DEC's
    targets, kNN) reads it instead of decoding each file again. In-memory sets are returned as they are.

    Collective in a distributed run: each rank decodes its contiguous share of the files, on its share
    of the node's cores, into one copy that the ranks of its node share (`du.node_shared_empty`); the
    shares of other nodes are all-gathered (in blocks of `gather_block_bytes` through the process group's
    device), so each file is decoded once in all and every node holds the whole copy once. A node whose
    shared memory is too small holds a copy per rank. A file that cannot be decoded is the same
    UnreadableImageError on every rank. If the copies on a node would take more than 80% of the memory
    available, that is a one-line ValueError before anything is decoded (not an out-of-memory kill later)."""
    from data.loaders import shard_bounds

    rank, world, ranks_on_node = dist_info.rank, dist_info.world_size, dist_info.local_world_size

    def decoded_bytes(data: ImageData) -> int:
        return len(data) * data.channels * data.image_size ** 2

    sets = (train_data, eval_data) if eval_data is not train_data else (train_data,)
    files = [data for data in sets if data.images is None]
    if files:
        _refuse_beyond_memory(f"{why}: decoding {sum(map(len, files))} files at {files[0].image_size} px",
                              sum(map(decoded_bytes, files)), ranks_on_node,
                              "set data.decode_once=false and data.loader=workers, or a smaller data.image_size")
    decoded = []
    for data in sets:
        if data.images is not None:
            decoded.append(data)
            continue
        first, last = shard_bounds(len(data), rank, world)
        images, sharers = du.node_shared_empty((len(data), data.channels, data.image_size, data.image_size))
        log.info("decoding the %d files of %s into memory at %d px (%s), once: %.2f GB%s", len(data), data.name,
                 data.image_size, why, decoded_bytes(data) / 1e9,
                 f"; this rank decodes {last - first} of them into " + (
                     f"one copy that the {world} ranks share" if len(sharers) == world else
                     f"a copy that {len(sharers)} rank(s) of this node share, then the copies exchange their rows")
                 if world > 1 else "")
        failure = None
        try:
            decode_files_into(images[first:last], data, first,
                              num_threads=max(1, du.available_cpu_cores() // ranks_on_node))
        except UnreadableImageError as exc:
            failure = exc
        # Every rank learns of a failure before the exchange, so all stop with the same line (not only one):
        # the lowest rank's, should several fail. Every rank has finished decoding when this returns.
        messages = [message for message in du.all_gather_object(failure and failure.one_line) if message]
        if messages:
            du.barrier()  # every rank ends here: leaving together, none tears its group down under another's gather
            raise UnreadableImageError(messages[0]) from failure
        if len(sharers) < world:  # the same on every rank: all share one copy, or some shares are elsewhere
            # The lowest rank of those sharing a copy fills in the rest; the others only take part.
            writes = rank == sharers[0]
            du.all_gather_shards_into(images, dist_info.device, block_bytes=gather_block_bytes,
                                      present=sharers if writes else range(world))
            # No rank reads a shared copy before its writer has filled it. Every rank waits, a rank alone
            # on its node too: a barrier that only some ranks entered would pair with a later one.
            du.barrier()
        decoded.append(replace(data, images=images))
    return decoded[0], decoded[-1]


class Trainer:
    def __init__(self, cfg: Config, method: Method, train_data, eval_data, *, dist_info: du.DistInfo,
                 run_dir: Path, writer: MetricWriter | None, evaluate_only: bool = False):
        """`evaluate_only`: the weights are only evaluated (`main.py --eval`), so what only training
        needs of the data (at least K images for each clustering, one full training batch per rank)
        is not asked."""
        from data.loaders import build_train_loader

        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = run_dir
        self.writer = writer
        self.train_data = train_data
        self.eval_data = eval_data
        self.amp_dtype = AMP_DTYPES[cfg.train.amp]
        # Unlabeled data (an image folder without class folders) give nothing to score kNN with.
        if cfg.eval.knn_every_epochs and not (train_data.has_labels and eval_data.has_labels):
            raise ValueError(f"eval.knn_every_epochs: the kNN monitor needs labels, and {train_data.name} has none; "
                             "set eval.knn_every_epochs=0")
        # k-means needs at least K points: refused here rather than at the first E-step, mid-run.
        cluster_counts = [("cluster.num_clusters", self.num_clusters(cfg.cluster.num_clusters), train_data),
                          ("eval.num_clusters", self.num_clusters(cfg.eval.num_clusters), eval_data),
                          *((key, k, train_data) for key, k in method.training_cluster_counts().items())]
        for key, k, data in ([] if evaluate_only else cluster_counts):
            if k > len(data):
                raise ValueError(f"{key}: {k} clusters, but the data have only {len(data)} images")
        if not evaluate_only:
            method.check_batch(batch_size_per_rank=cfg.train.batch_size_per_rank, world_size=dist_info.world_size)

        method = method.to(self.device)
        if cfg.model.channels_last:
            method = method.to(memory_format=torch.channels_last)
        if cfg.model.norm == "sync_batch" and du.is_dist():
            check_sync_batch_device(self.device, dist_info.world_size)
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        self.method = method
        if method.has_head and method.head_feature_kind is None:
            raise TypeError(f"{type(method).__name__}: has_head needs head_feature_kind "
                            "(the features predict_from_features takes)")
        self.stages = method.training_stages() or [Stage(name="train", epochs=cfg.train.epochs)]
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"{type(method).__name__}: stage names must be unique, got {names}")

        batch_size_per_rank = cfg.train.batch_size_per_rank
        if evaluate_only:  # never trains: a few images of another set must not fail the "one full batch" check
            batch_size_per_rank = min(batch_size_per_rank, max(1, len(train_data) // dist_info.world_size))
        phases = None
        extra = extra_training_rows(cfg.data, train_data)
        global_batch = dist_info.world_size * batch_size_per_rank
        if method.extra_rows_apart and extra and not evaluate_only:
            n = len(train_data)
            phases = [(n - extra, n), (0, n - extra)]
            for size, what in ((extra, "extra (unlabeled)"), (n - extra, "other")):
                if size < global_batch:
                    raise ValueError(f"train.batch_size_per_rank={batch_size_per_rank} x {dist_info.world_size} "
                                     f"rank(s): {type(method).__name__} trains the {size} {what} images in steps of "
                                     "their own, and they do not fill one batch; lower the batch size")
            log.info("each epoch trains on the %d extra (unlabeled) images first, then on the %d others",
                     extra, n - extra)
        # Decoded after the checks above, which need no images. The device loader holds the images whatever
        # the run does (an --eval run too), so its copy also serves the feature passes. The workers loader
        # keeps training on the files: given decoded images it would crop those instead of the whole
        # images, and `data.loader=auto` would switch to the device loader.
        device_loader = cfg.data.loader == "device"
        if device_loader or (cfg.data.decode_once and not evaluate_only):
            self.train_data, self.eval_data = decode_once(
                train_data, eval_data, "data.loader=device" if device_loader else "data.decode_once",
                dist_info=dist_info)
        self.loader = build_train_loader(
            self.train_data if device_loader else train_data, cfg.augment, batch_size_per_rank=batch_size_per_rank,
            num_views=method.num_views, device=self.device, rank=dist_info.rank, world_size=dist_info.world_size,
            seed=cfg.run.seed, mode=cfg.data.loader, num_workers=cfg.data.num_workers, phases=phases)
        self.steps_per_epoch = len(self.loader)
        if cfg.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        extra_steps = extra // global_batch   # the first phase's, in whole batches
        if phases is not None and self.steps_per_epoch <= extra_steps:
            log.warning("train.max_steps_per_epoch=%d ends every epoch within its first %d steps, on the extra images: "
                        "the other %d images are never trained",
                        self.steps_per_epoch, extra_steps, len(train_data) - extra)
        if self.steps_per_epoch < 1:
            raise ValueError(f"train.batch_size_per_rank={cfg.train.batch_size_per_rank} x {dist_info.world_size} ranks "
                             f"is larger than the training set ({len(train_data)} images): no full batch per epoch")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")

        self.epoch = 0              # next epoch to run (counted over all stages)
        self.global_step = 0
        self.epoch_step = 0         # steps done in epoch `self.epoch`: > 0 only in a run stopped mid-epoch
        # Sums of the method's terms over the steps of `self.epoch` done so far, and how many steps
        # they cover: saved mid-epoch, so a resumed epoch logs the averages of all its steps.
        self.epoch_term_sums: dict[str, float] = {}
        # Steps that returned each term: a method may leave a term out of some steps (CC's instance-only
        # steps on STL-10's unlabeled images have no cluster terms), and its average covers its own steps.
        self.epoch_term_counts: dict[str, int] = {}
        self.interrupted = False    # should_stop ended the run (apart from the method's own `stop_requested`)
        self.last_save_time = time.monotonic()
        self.last_checkpoint: tuple[Path, int] | None = None  # (path, global step) this run last wrote or resumed
        self.stage_index = 0        # the current stage; len(self.stages) once the last one is done
        self.stage_epoch = 0        # epochs done in the current stage
        self.stage_start_step = 0   # global step at which the current stage began
        self.stage_started = False  # the method's `start_stage` ran for the current stage
        self.stage_stopped = False  # the method ended the current stage early
        # The evaluations due at the end of epoch `epoch - 1` that a stop request ended: they run on resume.
        self.pending_evaluations: list[str] = []
        self.best: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}
        self.last_clusters: torch.Tensor | None = None  # (N_eval,) read-out of this process's last evaluation
        self.last_cluster_sizes: dict[str, float] = {}  # how last_clusters spread (`cluster_size_stats`)
        self.last_num_clusters = 0  # the K that last_clusters' ids are read against
        # The k-means read-out of the last evaluation ({"centroids": (K, D), "features", "metric"}), and the
        # step it was fitted at: a checkpoint keeps it only with the weights it belongs to (`state_dict`).
        self.readout: dict[str, Any] | None = None
        self.readout_step = -1
        self._feature_cache: dict[tuple, torch.Tensor] = {}
        self._pretrained_loaded = False
        self.model: torch.nn.Module = method
        self._enter_stage(0)

    # ------------------------------------------------------------------ stages
    @property
    def stage(self) -> Stage:
        return self.stages[min(self.stage_index, len(self.stages) - 1)]

    def _enter_stage(self, index: int) -> None:
        """Make stage `index` current: the method's mode, a fresh optimizer and lr schedule for the
        stage's parameters (loaded over by a checkpoint when resuming), and the DDP wrapper."""
        cfg = self.cfg
        self.stage_index = index
        stage = self.stage
        self.method.enter_stage(stage.name)
        self.total_steps = self.steps_per_epoch * stage.epochs   # steps of this stage
        global_batch = cfg.train.batch_size_per_rank * self.dist.world_size
        scale = global_batch / cfg.optim.lr_reference_batch if cfg.optim.lr_reference_batch else 1.0
        pick = lambda value, default: default if value is None else value  # noqa: E731
        self.base_lr = pick(stage.lr, cfg.optim.lr) * scale
        self.optimizer = build_optimizer(self.method.parameter_groups(), name=pick(stage.optimizer, cfg.optim.name),
                                         lr=self.base_lr, weight_decay=pick(stage.weight_decay, cfg.optim.weight_decay),
                                         momentum=pick(stage.momentum, cfg.optim.momentum),
                                         betas=tuple(cfg.optim.betas))
        self.schedule = LRSchedule(self.optimizer, base_lr=self.base_lr, total_steps=self.total_steps,
                                   warmup_steps=round(pick(stage.warmup_epochs, cfg.optim.warmup_epochs)
                                                      * self.steps_per_epoch),
                                   schedule=pick(stage.schedule, cfg.optim.schedule), min_lr=cfg.optim.min_lr,
                                   step_every=stage.lr_step_every, step_factor=stage.lr_step_factor)
        # Buffers (BN statistics, pseudo-labels) are not broadcast each step: pseudo-labels are set
        # identically on every rank by the EM loop, and BN statistics are averaged before evaluation.
        # DDP still broadcasts rank 0's buffers once, here; they are already equal on every rank (same
        # seed, the same checkpoint, or averaged by the evaluation that ends a stage).
        # A new stage may train other parameters, so DDP is rebuilt for it.
        if du.is_dist():
            self.model = None  # the previous wrapper (and its gradient hooks) goes first
            self.model = DistributedDataParallel(
                self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False)

    def _next_stage(self) -> None:
        self.stage_epoch, self.stage_start_step, self.stage_stopped = 0, self.global_step, False
        self.stage_started = False
        if self.stage_index + 1 < len(self.stages):
            self._enter_stage(self.stage_index + 1)
        else:
            self.stage_index = len(self.stages)

    def _cluster_fn(self) -> ClusterFn:
        """k-means as the `cluster` section sets it, seeded by the run's seed and the current epoch."""
        c = self.cfg.cluster
        seed = self.cfg.run.seed + self.epoch

        def cluster(features: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
            return cluster_features(features, num_clusters=num_clusters, metric=c.metric, n_init=c.n_init,
                                    max_iter=c.max_iter, tol=c.tol, seed=seed)

        return cluster

    def _start_stage(self) -> None:
        """One-time start of the current stage: the method's set-up from the whole dataset."""
        log.info("stage %d/%d: %s (%d epochs, %s, base lr %.4g)", self.stage_index + 1, len(self.stages),
                 self.stage.name, self.stage.epochs, type(self.optimizer).__name__, self.base_lr)
        context = StageContext(features=lambda kind: self._features(self.train_data, kind), cluster=self._cluster_fn(),
                               num_clusters=self.num_clusters(self.cfg.cluster.num_clusters))
        self.method.start_stage(self.stage.name, context)
        self.stage_started = True
        neighbours = self.method.mined_neighbours()
        if neighbours is not None and self.train_data.has_labels:
            from utils.evaluation import neighbour_precision

            precision = neighbour_precision(neighbours, self.train_data.labels)
            log.info("mined neighbours: %.4f of (image, neighbour) pairs share a class", precision)
            if self.dist.is_main and self.writer is not None:  # rank 0 only
                self.writer.write(self._epoch_record(self.epoch, {"mining/neighbour_precision": precision}),
                                  step=self.global_step)

    def load_pretrained(self) -> None:
        """Start from the weights of the earlier run the method names (`pretrained_checkpoint()`), once.
        A resumed run already holds (and has trained) them. A missing, unreadable or mismatched file
        is a ValueError naming it; the launcher calls this before the run directory is written."""
        path = self.method.pretrained_checkpoint()
        if not path or self.global_step > 0 or self._pretrained_loaded:
            return
        try:
            state = load_checkpoint(Path(path), map_location="cpu")
            self.method.load_pretrained(state["model"])
        except FileNotFoundError as exc:
            raise ValueError(f"pretrained weights: {exc}") from None
        except RuntimeError as exc:  # load_state_dict: another architecture
            raise ValueError(f"{path}: the pretrained weights do not match the config ({one_line(exc)})") from None
        self._pretrained_loaded = True
        self._feature_cache.clear()
        log.info("loaded pretrained weights from %s (its run: epoch %d, step %d)", path, int(state["epoch"]),
                 int(state["global_step"]))

    # ------------------------------------------------------------------ the loop
    def fit(self, should_stop: Callable[[], bool] | None = None) -> FitResult:
        """Train to the end of the last stage, the time budget, or a stop request: `should_stop()` is
        asked after every step on every rank, and once it is true on any of them, all ranks end that
        same step and save last.pt (with the position inside the epoch) without evaluating."""
        cfg = self.cfg
        start = time.perf_counter()
        # before fit, only `load` sets last_checkpoint: the position this process resumed the run at
        resumed_at = None if self.last_checkpoint is None else (self.epoch, self.epoch_step)
        self.load_pretrained()
        log.info("training %s: %s; %d steps per epoch (global batch %d) on %s x %d", cfg.method.name,
                 ", ".join(f"{s.name} {s.epochs} epochs" for s in self.stages), self.steps_per_epoch,
                 cfg.train.batch_size_per_rank * self.dist.world_size, self.device, self.dist.world_size)
        out_of_time = False
        if self.pending_evaluations:
            self._run_pending_evaluations(should_stop)
        while self.stage_index < len(self.stages) and not (out_of_time or self.interrupted):
            stage = self.stage
            if not self.stage_started:
                self._start_stage()
            while self.stage_epoch < stage.epochs and not self.stage_stopped:
                epoch = self.epoch
                # A run resumed mid-epoch has this epoch's pseudo-labels in its checkpoint (buffers).
                if self.method.wants_pseudo_labels(epoch) and (
                        (epoch % cfg.cluster.every_epochs == 0 and self.epoch_step == 0)
                        or not self.method.has_pseudo_labels()) and not self._e_step(epoch, should_stop):
                    break
                train_stats = self.train_one_epoch(epoch, should_stop)
                if self.interrupted and self.epoch_step < self.steps_per_epoch:  # saved by train_one_epoch
                    log.info("stop requested: saved epoch %d at its step %d/%d (global step %d) to %s",
                             epoch, self.epoch_step, self.steps_per_epoch, self.global_step,
                             self.run_dir / "last.pt")
                    break
                self.epoch_step = 0
                self.epoch = epoch + 1
                self.stage_epoch += 1
                minutes = (time.perf_counter() - start) / 60
                out_of_time = bool(cfg.train.time_budget_minutes) and minutes >= cfg.train.time_budget_minutes
                # rank 0's clock decides, so every rank stops (and saves) at the same epoch
                out_of_time, save_due = du.broadcast_object((out_of_time, self._save_due()))
                stage_done = self.stage_epoch == stage.epochs or self.stage_stopped
                last = (stage_done and self.stage_index == len(self.stages) - 1) or out_of_time
                record = self._epoch_record(epoch, {f"train/{k}": v for k, v in train_stats.items()})
                due = self._evaluations_due(stage_done=stage_done, last=last)
                # The run's last evaluation is its result: a stop request waits for that one.
                done, result = self._stoppable(f"the evaluation of epoch {epoch}", lambda: self._run_evaluations(
                    epoch, due, None if last else should_stop))
                evaluated, is_best = result if done else ({}, False)
                if not done:
                    self.pending_evaluations = due
                record.update(evaluated)
                if self.dist.is_main and self.writer is not None:  # rank 0 only
                    self.writer.write(record, step=self.global_step)
                if (self.epoch % cfg.train.save_every_epochs == 0 or last or is_best or stage_done
                        or self.interrupted or save_due):
                    self.save(best=is_best)
                if self.interrupted:
                    log.info("stop requested: saved after epoch %d to %s", epoch, self.run_dir / "last.pt")
                    break
                if out_of_time:
                    log.info("time budget of %.1f min reached after epoch %d", cfg.train.time_budget_minutes, epoch)
                    break
            if self.stage_epoch < stage.epochs and not self.stage_stopped:
                break  # left inside the stage (time budget or stop request): last.pt resumes it
            log.info("stage %s done after %d epochs (step %d)%s", stage.name, self.stage_epoch, self.global_step,
                     ": the method asked to stop" if self.stage_stopped else "")
            self._next_stage()
        return FitResult(epochs_total=self.epoch, metrics=self.last_metrics, best=self.best,
                         seconds=time.perf_counter() - start,
                         stopped_on_request=self.interrupted and self.stage_index < len(self.stages),
                         resumed_at=resumed_at)

    def _stoppable(self, what: str, run: Callable[[], Any]) -> tuple[bool, Any]:
        """(True, `run()`), or (False, None) when a stop request ended one of its feature passes
        (`StopRequested`): `interrupted` is then set and the RNG state is put back to where it was before
        `run` (whatever `run` drew before the stop), where the resumed run starts `what` again."""
        rng_before = capture_rng_state()
        try:
            return True, run()
        except StopRequested as exc:
            restore_rng_state(rng_before)
            self.interrupted = True
            log.info("stop requested during %s (%s): it runs again on resume", what, exc)
            return False, None

    def _e_step(self, epoch: int, should_stop: Callable[[], bool] | None) -> bool:
        """`update_pseudo_labels`; False when a stop request ended its feature pass, after saving last.pt
        at the epoch's start (its step 0, or the mid-epoch step a resumed run was at)."""
        done, _ = self._stoppable(f"the E-step of epoch {epoch}", lambda: self.update_pseudo_labels(should_stop))
        if not done:
            self.save(best=False)  # not save_mid_epoch: the pass averaged the ranks' BN statistics as it began
            log.info("saved epoch %d at its step %d/%d (global step %d) to %s", epoch, self.epoch_step,
                     self.steps_per_epoch, self.global_step, self.run_dir / "last.pt")
        return done

    def _evaluations_due(self, *, stage_done: bool, last: bool) -> list[str]:
        """What ends the epoch just done (`self.epoch` is the next one): "cluster" (the read-out's NMI / ACC /
        ARI) every `eval.every_epochs` and after a stage, "knn" every `eval.knn_every_epochs`; both after
        the run's last epoch."""
        e, due = self.cfg.eval, []
        if self.epoch % e.every_epochs == 0 or stage_done or last:
            due.append("cluster")
        if e.knn_every_epochs and (self.epoch % e.knn_every_epochs == 0 or last):
            due.append("knn")
        return due

    def _run_evaluations(self, epoch: int, due: list[str],
                         should_stop: Callable[[], bool] | None = None) -> tuple[dict[str, float], bool]:
        """The evaluations `due` at the end of `epoch`, logged: (the epoch record's eval/ entries, whether
        it is the best epoch so far by `eval.best_metric`, which updates `best`; `eval/seconds`: what they
        took, which bench/methods.py prices apart from the epochs). `should_stop` may end their feature
        passes (`StopRequested`) before `best` changes."""
        started = time.perf_counter()
        record: dict[str, float] = {}
        epoch_metrics: dict[str, float] = {}
        if "cluster" in due:
            if self.method.selects_readout():   # e.g. SCAN's head, chosen for the weights read out
                self.method.select_readout(self._features(self.train_data, self.method.readout_selection_feature_kind,
                                                          should_stop))
                # the read-out's own features may depend on the choice: none cached from before it
                self._feature_cache = {key: value for key, value in self._feature_cache.items()
                                       if key[1] != self.method.head_feature_kind}
            self.last_metrics = self.evaluate(should_stop)
            epoch_metrics.update(self.last_metrics)
            record.update({f"eval/{k}": v for k, v in self.last_cluster_sizes.items()})
            log.info("epoch %d: %s  (%s)", epoch,
                     "  ".join(f"{k} {v:.4f}" for k, v in self.last_metrics.items()) or "no labels to score",
                     format_cluster_sizes(self.last_cluster_sizes))
        if "knn" in due:
            epoch_metrics["knn_acc"] = self.knn_evaluate(should_stop)
            log.info("epoch %d: knn_acc %.4f", epoch, epoch_metrics["knn_acc"])
        record.update({f"eval/{k}": v for k, v in epoch_metrics.items()})
        if due:
            record["eval/seconds"] = time.perf_counter() - started
        key = self.cfg.eval.best_metric
        is_best = key in epoch_metrics and (key not in self.best or epoch_metrics[key] > self.best[key])
        if is_best:  # best.pt: the best `eval.best_metric` among the epochs that measured it
            self.best = dict(epoch_metrics)
        return record, is_best

    def _run_pending_evaluations(self, should_stop: Callable[[], bool] | None) -> bool:
        """The evaluations a stop request ended at the end of epoch `self.epoch - 1`, run on the weights
        they were due for (the resumed ones), then logged and saved as they would have been then
        (best.pt included). False when a stop request ends them again: last.pt still lists them."""
        epoch = self.epoch - 1
        done, result = self._stoppable(f"the evaluation of epoch {epoch}", lambda: self._run_evaluations(
            epoch, self.pending_evaluations, should_stop))
        if not done:
            return False
        evaluated, is_best = result
        self.pending_evaluations = []
        record = self._epoch_record(epoch, evaluated)  # still the stage `epoch` trained in: it ended after the save
        if self.dist.is_main and self.writer is not None:  # rank 0 only
            self.writer.write(record, step=self.global_step)
        self.save(best=is_best)
        return True

    def _epoch_record(self, epoch: int, entries: dict[str, float]) -> dict[str, Any]:
        """metrics.jsonl's record of `epoch` (trained in the current stage, named when there are several)."""
        record: dict[str, Any] = {"epoch": epoch, **entries}
        if len(self.stages) > 1:
            record["stage"] = self.stage.name
        return record

    def train_one_epoch(self, epoch: int, should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
        """Steps `self.epoch_step`.. of the epoch (0.. unless resumed mid-epoch), advancing `epoch_step`;
        once `should_stop()` is true on any rank, saves that step (mid-epoch) and returns early with
        `interrupted` set."""
        cfg = self.cfg
        self.model.train()
        first = self.epoch_step
        self.loader.set_partners(self.method.training_partners())
        self.loader.set_views(self.method.training_views())
        self.loader.set_clean_views(self.method.clean_training_views())
        self.loader.set_epoch(epoch, first_batch=first)
        if first == 0:
            self.epoch_term_sums, self.epoch_term_counts = {}, {}
        sums, counts = self.epoch_term_sums, self.epoch_term_counts
        images = 0
        start = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch}", leave=False, mininterval=2.0,
                   disable=not (self.dist.is_main and cfg.logging.progress_bar))
        for step_in_epoch, batch in enumerate(self.loader, start=first):
            if step_in_epoch >= self.steps_per_epoch:
                break
            interval = self.method.refresh_every_steps
            if interval and (self.global_step - self.stage_start_step) % interval == 0:
                self.refresh(epoch)
                if self.stage_stopped:
                    break
            terms = self.train_step(batch.views, batch.indices, epoch)
            self.epoch_step = step_in_epoch + 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            images += batch.indices.shape[0] * self.dist.world_size
            bar.update(1)
            if self.global_step % cfg.train.log_every_steps == 0:
                bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()})
                if self.dist.is_main and self.writer is not None:  # rank 0 only
                    self.writer.write({"epoch": epoch, **{f"step/{k}": v for k, v in terms.items()}},
                                      step=self.global_step)
            # Collective, every step: all ranks end (or save at) the same step even when the signal
            # reached one, or one rank's clock runs ahead.
            if should_stop is not None or cfg.train.save_every_minutes:
                stop, save = du.any_rank([should_stop is not None and should_stop(), self._save_due()],
                                         self.device)
                if (stop or save) and self.epoch_step < self.steps_per_epoch:  # the epoch's end saves for itself
                    self.save_mid_epoch()
                if stop:
                    self.interrupted = True
                    break
        bar.close()
        seconds = time.perf_counter() - start
        # The terms average over every step of the epoch, those before a mid-epoch resume included;
        # the speed figures cover only the steps this call ran.
        stats = {k: v / counts[k] for k, v in sums.items()}
        stats["images_per_s"] = images / max(seconds, 1e-9)
        stats["epoch_seconds"] = seconds
        return stats

    def train_step(self, views: list[torch.Tensor], indices: torch.Tensor, epoch: int) -> dict[str, float]:
        """One optimisation step; returns the method's named terms (local values) and the lr."""
        progress = Progress(epoch=epoch, global_step=self.global_step, steps_per_epoch=self.steps_per_epoch,
                            total_steps=self.stage_start_step + self.total_steps, stage=self.stage.name,
                            stage_step=self.global_step - self.stage_start_step)
        lr = self.schedule.apply()
        if self.cfg.model.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            terms = self.model(views, indices, progress)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            saved = ("no checkpoint was saved yet" if self.last_checkpoint is None else
                     "the last checkpoint, {}, is from global step {}".format(*self.last_checkpoint))
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {self.global_step}: lower optim.lr "
                                     f"or check the data; {saved}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for parameter in self.method.parameters_left_alone():
            parameter.grad = None   # the optimiser skips it and leaves its state as it was
        if self.cfg.optim.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.optim.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_optimizer_step(progress)
        self.schedule.advance()
        self.global_step += 1
        self._feature_cache.clear()  # the network changed
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["lr"] = lr
        return out

    # ------------------------------------------------------------------ E-step and evaluation
    def _features(self, data, kind: str, should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """Features of a whole dataset, cached until the next optimiser step (the E-step that follows
        an evaluation on the same data and features reuses them instead of a second pass). With
        `should_stop`, a stop request ends the pass with `StopRequested` (`extract_features`)."""
        key = (id(data), kind, self.global_step)
        if key not in self._feature_cache:
            self.method.eval()
            du.average_buffers(self.method)
            start = time.perf_counter()
            shuffle_seed = self.cfg.run.seed if self.method.batch_statistics_in_eval else None
            try:
                feats = extract_features(lambda x: self.method.eval_features(x, kind), data,
                                         batch_size=self.cfg.cluster.extract_batch_size, device=self.device,
                                         amp_dtype=self.amp_dtype, num_workers=self.cfg.data.num_workers,
                                         normalize=self.cfg.augment.normalize, should_stop=should_stop,
                                         shuffle_seed=shuffle_seed)
            finally:
                self.model.train()
            log.info("extracted %s features %s in %.2fs", kind, tuple(feats.shape), time.perf_counter() - start)
            self._feature_cache[key] = feats
        return self._feature_cache[key]

    def eval_set_features(self, should_stop: Callable[[], bool] | None = None) -> tuple[str, torch.Tensor]:
        """(kind, features (N_eval, D)) of the evaluation set, the kind k-means reads out
        (`eval.features`, or the method's default), gathered across ranks in dataset order."""
        kind = self.cfg.eval.features or self.method.default_eval_features
        return kind, self._features(self.eval_data, kind, should_stop)

    def num_clusters(self, requested: int) -> int:
        """K for `requested` = `cluster.num_clusters` or `eval.num_clusters` (see `resolve_num_clusters`)."""
        return resolve_num_clusters(self.cfg, self.train_data, requested)

    def refresh(self, epoch: int) -> None:
        """The method's step-level refresh from the whole training set's features (gathered across
        ranks, N rows), then NMI / ACC / ARI of the read-out, logged; may end the stage."""
        start = time.perf_counter()
        stats = self.method.refresh(self._features(self.train_data, self.method.refresh_feature_kind))
        self.stage_stopped = bool(self.method.stop_requested())
        metrics = self.evaluate()
        record = {"epoch": epoch, "stage": self.stage.name, "stage_step": self.global_step - self.stage_start_step,
                  **{f"refresh/{k}": v for k, v in stats.items()}, **{f"eval/{k}": v for k, v in metrics.items()},
                  **{f"eval/{k}": v for k, v in self.last_cluster_sizes.items()}}
        log.info("%s step %d: %s  (%s; %.2fs)%s", self.stage.name, record["stage_step"],
                 "  ".join(f"{k} {v:.4f}" for k, v in {**stats, **metrics}.items()),
                 format_cluster_sizes(self.last_cluster_sizes), time.perf_counter() - start,
                 "  -> stop" if self.stage_stopped else "")
        if self.dist.is_main and self.writer is not None:  # rank 0 only
            self.writer.write(record, step=self.global_step)

    def update_pseudo_labels(self, should_stop: Callable[[], bool] | None = None) -> None:
        """The E-step; `should_stop` may end its feature pass (`StopRequested`) before the method changes."""
        feats = self._features(self.train_data, self.method.pseudo_label_feature_kind, should_stop)
        self.method.update_from_features(feats, self._cluster_fn(), self.num_clusters(self.cfg.cluster.num_clusters))

    def evaluate(self, should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
        """NMI / ACC / ARI of the method's read-out on the evaluation set's labelled rows (same on every
        rank; empty for unlabeled data). The read-out itself, (N_eval,), is kept in `last_clusters`; a
        k-means read-out's centroids in `readout`. `should_stop` may end the feature pass (`StopRequested`)."""
        if self.method.has_head:
            predictions = self.method.predict_from_features(self._features(self.eval_data,
                                                                           self.method.head_feature_kind, should_stop))
            return self._score(predictions, self.num_clusters(self.cfg.cluster.num_clusters))
        kind, feats = self.eval_set_features(should_stop)
        k = self.num_clusters(self.cfg.eval.num_clusters)
        predictions, centroids = cluster_features(
            feats, num_clusters=k, metric=self.cfg.cluster.metric, n_init=self.cfg.eval.n_init,
            max_iter=self.cfg.eval.max_iter, tol=self.cfg.cluster.tol, seed=self.cfg.run.seed)
        self.readout = {"centroids": centroids.cpu(), "features": kind, "metric": self.cfg.cluster.metric}
        self.readout_step = self.global_step
        return self._score(predictions, k)

    def assign(self, readout: dict[str, Any] | None) -> dict[str, float]:
        """Like `evaluate`, but a k-means read-out is not fitted again: each image of the evaluation set
        goes to the nearest of `readout`'s centroids (a checkpoint's), so other images get the cluster
        ids of the run that wrote it (the features and metric are `readout`'s; `main.py --eval assign`
        refuses an `eval.*` that asks for others).
        A head's read-out is per image already: `readout` may then be None."""
        if self.method.has_head:
            return self.evaluate()
        feats = self._features(self.eval_data, readout["features"])
        return self._score(assign_to_centroids(feats, readout["centroids"], metric=readout["metric"]),
                           readout["centroids"].shape[0])

    def _score(self, predictions: torch.Tensor, num_clusters: int) -> dict[str, float]:
        """Keep `predictions` (N_eval,) as `last_clusters` (of `num_clusters`, kept as `last_num_clusters`)
        and how they spread over them as `last_cluster_sizes` (label-free); their NMI / ACC / ARI on the
        labelled rows."""
        from torch_clustering import evaluate_clustering

        self.last_clusters = predictions.cpu()
        self.last_num_clusters = num_clusters
        self.last_cluster_sizes = cluster_size_stats(self.last_clusters, num_clusters)
        labels = self.eval_data.labels
        known = labels >= 0
        if not known.any():
            return {}
        scores = evaluate_clustering(labels[known].cpu(), self.last_clusters[known])
        return {k: float(scores[k]) for k in ("nmi", "acc", "ari")}

    def knn_evaluate(self, should_stop: Callable[[], bool] | None = None) -> float:
        """Weighted kNN top-1 of the eval set's labelled rows against the training set's labelled rows
        (same on every rank). Reuses the features `evaluate()` extracted at this step. When the eval set
        is the training set (the train+test clustering protocol), each query leaves itself out."""
        from utils.evaluation import knn_accuracy

        e = self.cfg.eval
        kind = e.features or self.method.default_eval_features
        memory = self._features(self.train_data, kind, should_stop)
        queries = self._features(self.eval_data, kind, should_stop)
        memory_labels, query_labels = self.train_data.labels.to(memory.device), self.eval_data.labels.to(memory.device)
        known_memory, known_query = memory_labels >= 0, query_labels >= 0
        return knn_accuracy(memory[known_memory], memory_labels[known_memory], queries[known_query],
                            query_labels[known_query], k=e.knn_k, temperature=e.knn_temperature,
                            num_classes=self.train_data.num_classes, chunk_size=e.knn_chunk_size,
                            leave_one_out=self.eval_data is self.train_data)

    def linear_evaluate(self) -> dict[str, Any]:
        """Linear probe on frozen `eval.linear_features`: trained on the train split's labels, top-1 on the
        test split; a seeded 80/20 split of the train split when the dataset has no test split."""
        from utils.evaluation import linear_probe

        e = self.cfg.eval
        train = self._dataset_of_split("train")
        try:
            test = self._dataset_of_split("test")
            protocol = "train/test"
        except ValueError:  # e.g. mnist_5k: training images only
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.cfg.run.seed))
            cut = int(0.8 * len(train))
            train, test = train.subset(order[:cut]), train.subset(order[cut:])
            protocol = "80/20 split of train"
        self._probe_sets = (train, test)  # alive while cached: the feature cache is keyed by id(data)
        x_train, x_test = self._features(train, e.linear_features), self._features(test, e.linear_features)
        y_train, y_test = train.labels, test.labels
        augmented = self._augmented_features(train, e.linear_features) if e.linear_augment else None
        start = time.perf_counter()
        acc = linear_probe(x_train[(y_train >= 0).to(x_train.device)], y_train[y_train >= 0],
                           x_test[(y_test >= 0).to(x_test.device)], y_test[y_test >= 0],
                           epochs=e.linear_epochs, lr=e.linear_lr, weight_decay=e.linear_weight_decay,
                           batch_size=e.linear_batch_size, seed=self.cfg.run.seed, num_classes=train.num_classes,
                           augmented_train=augmented)
        acc = float(du.broadcast_object(acc))  # rank 0's number on every rank
        log.info("linear probe (%s, %s features): top-1 %.4f in %.2fs", protocol, e.linear_features, acc,
                 time.perf_counter() - start)
        return {"linear_acc": acc, "protocol": protocol, "features": e.linear_features,
                "augment": e.linear_augment, "train_rows": len(train), "test_rows": len(test)}

    def _dataset_of_split(self, split: str):
        """The images of `split` (train | test): the run's training or evaluation set when it holds exactly
        that split's rows, so that features another mode extracted at this step are reused (on
        ImageNet-size data a pass takes minutes); otherwise built."""
        from data.datasets import build_dataset

        data_cfg = self.cfg.data
        if data_cfg.split == split and not data_cfg.stl10_unlabeled:
            return self.train_data
        if data_cfg.resolved_eval_split == split:
            return self.eval_data
        return build_dataset(data_cfg, split=split)

    def _augmented_features(self, data, kind: str):
        """epoch -> (features, labels) of the labelled rows of `data` under the training augmentation
        (`augment.*`, one view, a fresh draw each epoch), gathered from every rank; full batches of
        `cluster.extract_batch_size` per rank, so a random remainder is left out of each epoch."""
        from data.loaders import build_train_loader

        batch = min(self.cfg.cluster.extract_batch_size, len(data) // self.dist.world_size)
        loader = build_train_loader(data, self.cfg.augment, batch_size_per_rank=batch, num_views=1,
                                    device=self.device, rank=self.dist.rank, world_size=self.dist.world_size,
                                    seed=self.cfg.run.seed + 1, mode=self.cfg.data.loader,
                                    num_workers=self.cfg.data.num_workers)
        labels = data.labels.to(self.device)

        @torch.no_grad()
        def features_of_epoch(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
            self.method.eval()
            loader.set_epoch(epoch)
            feats, rows = [], []
            for b in loader:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    feats.append(self.method.eval_features(b.views[0], kind).float())
                rows.append(b.indices)
            feats, rows = du.all_gather_no_grad(torch.cat(feats)), du.all_gather_no_grad(torch.cat(rows))
            known = labels[rows] >= 0
            return feats[known], labels[rows][known]

        return features_of_epoch

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_class": type(self.optimizer).__name__,
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "epoch_step": self.epoch_step,
            "epoch_term_sums": dict(self.epoch_term_sums),
            "epoch_term_counts": dict(self.epoch_term_counts),
            "stage": self.stage_index,
            "stage_name": self.stage.name,
            "stage_epoch": self.stage_epoch,
            "stage_start_step": self.stage_start_step,
            "stage_started": self.stage_started,
            "stage_stopped": self.stage_stopped,
            "pending_evaluations": list(self.pending_evaluations),
            "best": dict(self.best),
            "last_metrics": dict(self.last_metrics),
            # Only with the weights it was fitted on: not after the steps of a mid-epoch save, nor at an
            # epoch saved without an evaluation.
            "readout": self.readout if self.readout_step == self.global_step else None,
            "config": self.cfg.to_dict(),
        }

    def _save_due(self) -> bool:
        minutes = self.cfg.train.save_every_minutes
        return bool(minutes) and time.monotonic() - self.last_save_time >= minutes * 60

    def save_mid_epoch(self) -> None:
        """last.pt at the current step, resumable at the next batch (`epoch_step`). Collective."""
        # Mid-epoch the ranks' BN statistics differ (they are averaged before each evaluation) and
        # last.pt holds rank 0's. Their update is linear, so averaging now and again at the next
        # evaluation gives what averaging once there would have.
        du.average_buffers(self.method)
        self.save(best=False)

    def save(self, *, best: bool) -> None:
        """Collective (RNG states come from every rank); rank 0 writes best.pt then last.pt."""
        self.last_save_time, self.last_checkpoint = time.monotonic(), (self.run_dir / "last.pt", self.global_step)
        state = self.state_dict()
        state["rng"] = gather_rng_states()
        if self.dist.is_main:  # rank 0 only
            if best:
                save_checkpoint(state, self.run_dir / "best.pt")
            save_checkpoint(state, self.run_dir / "last.pt")
        du.barrier()

    def load(self, state: dict, path: Path) -> None:
        """Resume from `state` = load_checkpoint(path): model, optimizer, schedule, scaler, position and
        this rank's RNG state. A checkpoint of another config is a ValueError naming `path`."""
        load_model_state(self.method, state["model"], path)
        # Checkpoints of single-stage runs before stages existed: stage 0, its epochs are the run's.
        stage = int(state.get("stage", 0))
        names = [s.name for s in self.stages]
        if "stage_name" in state and (stage >= len(names) or names[stage] != state["stage_name"]):
            raise ValueError(f"{path}: written in stage {state['stage_name']!r} (index {stage}), but this "
                             f"config's stages are {names}")
        self._enter_stage(stage)
        self.stage_epoch = int(state.get("stage_epoch", state["epoch"]))
        self.stage_start_step = int(state.get("stage_start_step", 0))
        self.stage_stopped = bool(state.get("stage_stopped", False))
        # torch loads one optimizer's state into another without a word (SGD's momentum into AdamW)
        # and fails at the first step; the class is saved beside the state to refuse that here.
        saved_class, current_class = state.get("optimizer_class"), type(self.optimizer).__name__
        if saved_class is not None and saved_class != current_class:
            raise ValueError(f"{path}: written by {saved_class}, but this config's stage {self.stage.name!r} "
                             f"trains with {current_class}; resume with the optimizer the run started with")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:  # other parameter groups
            raise ValueError(f"{path}: the checkpoint's optimizer state does not match the config "
                             f"({one_line(exc)})") from None
        self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.last_checkpoint = (path, self.global_step)
        self.epoch_step = int(state.get("epoch_step", 0))
        # Checkpoints from before this was saved: a stage was started once a step or an epoch of it ran.
        self.stage_started = bool(state.get("stage_started", self.stage_epoch > 0 or self.epoch_step > 0))
        if not 0 <= self.epoch_step < self.steps_per_epoch:
            raise ValueError(f"{path}: stopped at step {self.epoch_step} of its epoch, but this config has "
                             f"{self.steps_per_epoch} steps per epoch; resume with the data, batch size and ranks "
                             "it ran with")
        # Checkpoints from before these were saved: the resumed epoch averages only its own steps.
        self.epoch_term_sums = {k: float(v) for k, v in state.get("epoch_term_sums", {}).items()}
        # Checkpoints from before per-term counts kept one count of steps: every term came from every step.
        self.epoch_term_counts = {k: int(v) for k, v in state.get(
            "epoch_term_counts", {k: state.get("epoch_term_steps", 0) for k in self.epoch_term_sums}).items()}
        self.best = dict(state["best"])
        self.pending_evaluations = list(state.get("pending_evaluations", []))
        self.last_metrics = dict(state.get("last_metrics", {}))
        self.readout = state.get("readout")
        self.readout_step = self.global_step if self.readout is not None else -1
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            restore_rng_state(rngs[self.dist.rank])
        else:
            log.warning("checkpoint was written by %d ranks, resuming on %d: RNG streams restart from rank 0's",
                        len(rngs), self.dist.world_size)
            restore_rng_state(rngs[0])
        self._feature_cache.clear()
        log.info("resumed from %s at epoch %d%s (step %d, stage %s, its epoch %d)", path, self.epoch,
                 f", its step {self.epoch_step}" if self.epoch_step else "", self.global_step, self.stage.name,
                 self.stage_epoch)

