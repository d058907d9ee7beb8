"""Training loaders (random views, sharded like DistributedSampler with drop_last) and the
deterministic, contiguous per-rank pass used for feature extraction.

Two training loaders behind one interface (`TrainLoader`):

* `DeviceTensorLoader` keeps the whole uint8 dataset on the training device and augments each batch
  there with `BatchAugment` (no worker processes; the fast path for MNIST/CIFAR/STL-10 sized sets).
* `WorkersLoader` is a torch DataLoader whose worker processes decode files (imagefolder) and apply
  the per-sample torchvision.transforms.v2 pipeline.

Both take the same indices for the same (seed, epoch, rank, world size): a permutation of all N
indices from a generator seeded with seed + epoch (identical on every rank), cut to (N // W) * W and
dealt out rank r <- perm[r::W], in batches of `batch_size_per_rank`, the last incomplete batch
dropped. Views are reproducible: the device loader re-seeds its generator from (seed, epoch, rank)
when an epoch starts; the workers loader seeds each sample from (seed, epoch, index), whatever the
number of workers. An epoch may start at any batch (`set_epoch(epoch, first_batch=b)`, a run resumed
mid-epoch) and yields exactly the batches b, b+1, ... of the uninterrupted epoch: the device loader
first draws, without applying them, the augmentation parameters of the b batches it skips.

Partner views (SCAN's neighbours): after `set_partners(table)`, a (N, M) table of candidate rows per
image, every odd-numbered view of image i is made from one of its candidates instead of i itself,
drawn uniformly from its row by a seed of (seed, epoch, i): the same partner in both loaders, with any
number of workers, and in a resumed epoch. Clean views (SCAN's self-labelling): after
`set_clean_views(views)`, the views numbered in `views` are the evaluation transform of their image
(no augmentation), the others augmented as before. View count: after `set_views(count)`, batches hold
only the first `count` of the loader's views; the others are neither augmented nor drawn for (a resumed
epoch still gets the uninterrupted epoch's views). Phases (`phases=`, set when the loader is built): the
epoch visits row ranges one after another, each shuffled on its own and cut to whole global batches, so
that no step mixes two of them (CC on STL-10 trains on the unlabeled images first, then on the rest).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from data.augment import BatchAugment, EvalTransform, build_batch_augments, build_sample_transform
from data.config import AugmentConfig
from data.datasets import ImageData, decode_files, load_image_file, read_image_file

logger = logging.getLogger(__name__)

LOADER_MODES = ("device", "workers", "auto")


@dataclass
class TrainBatch:
    """views: num_views tensors (B, C, S, S) float32 on the device; indices: (B,) int64 on the device,
    the rows of the dataset (for pseudo-label look-up); partners: (B,) int64 on the device, the rows the
    odd-numbered views show (`set_partners`), or None."""

    views: list[torch.Tensor]
    indices: torch.Tensor
    partners: torch.Tensor | None = None


@runtime_checkable
class TrainLoader(Protocol):
    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Reshuffle (permutation from seed + epoch); the next pass starts at batch `first_batch` of
        the epoch (the batches before it are skipped without being loaded)."""

    def set_partners(self, table: torch.Tensor | None) -> None:
        """From the next epoch on, odd-numbered views show a partner drawn from table[i] (N, M) int64
        instead of image i (None: every view shows image i)."""

    def set_views(self, count: int) -> None:
        """From the next epoch on, batches hold the first `count` views (1..num_views)."""

    def set_clean_views(self, views: Sequence[int]) -> None:
        """From the next epoch on, the views numbered in `views` are the evaluation transform (no
        augmentation) of their image; () = every view augmented."""

    def __len__(self) -> int:
        """Batches per full epoch on this rank (whatever `first_batch`)."""

    def __iter__(self) -> Iterator[TrainBatch]: ...


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous rows [start, stop) of n: [r * ceil(n / W), min(n, (r + 1) * ceil(n / W))).
    Every shard but the last has ceil(n / W) rows, so all-gathering shards padded to that length and
    trimming to n rows restores dataset order. A shard may be empty when n < W."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    per_rank = -(-n // world_size)
    return min(n, rank * per_rank), min(n, (rank + 1) * per_rank)


def epoch_permutation(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """(n,) int64 CPU permutation of the epoch, the same on every rank and device."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator)


Phases = Sequence[tuple[int, int]]


def rank_indices(n: int, *, seed: int, epoch: int, rank: int, world_size: int, phases: Phases | None = None,
                 batch_size_per_rank: int = 1) -> torch.Tensor:
    """The indices rank `rank` visits in `epoch`, in order (DistributedSampler semantics, drop_last).

    With `phases`, (start, stop) row ranges that cover [0, n) in the order the epoch visits them (see
    `check_phases`): each range has its own permutation, from (seed, epoch, phase number), is cut to
    whole global batches (world_size x batch_size_per_rank rows) and dealt out like the whole set, and
    the ranges follow one another, so no batch of any rank mixes rows of two of them."""
    if phases is None:
        usable = (n // world_size) * world_size
        return epoch_permutation(n, seed=seed, epoch=epoch)[:usable][rank::world_size]
    global_batch = world_size * batch_size_per_rank
    parts = []
    for number, (start, stop) in enumerate(phases):
        generator = torch.Generator().manual_seed(mixed_seed(seed, epoch, number))
        usable = (stop - start) // global_batch * global_batch
        parts.append((torch.randperm(stop - start, generator=generator) + start)[:usable][rank::world_size])
    return torch.cat(parts)


def check_phases(phases: Phases | None, n: int, *, batch_size_per_rank: int, world_size: int) -> list | None:
    """phases as a list of (start, stop) int pairs that tile [0, n) in some order, each holding at least one
    global batch (world_size x batch_size_per_rank rows), or a ValueError naming what is wrong."""
    if phases is None:
        return None
    phases = [(int(start), int(stop)) for start, stop in phases]
    ordered = sorted(phases)
    tiles = (bool(ordered) and ordered[0][0] == 0 and ordered[-1][1] == n
             and all(start < stop for start, stop in ordered)
             and all(stop == start for (_, stop), (start, _) in zip(ordered, ordered[1:])))
    if not tiles:
        raise ValueError(f"phases: expected (start, stop) row ranges that tile [0, {n}), got {phases}")
    global_batch = world_size * batch_size_per_rank
    for start, stop in phases:
        if stop - start < global_batch:
            raise ValueError(f"phases: rows [{start}, {stop}) do not fill one batch of {batch_size_per_rank} on each "
                             f"of {world_size} rank(s); lower the batch size")
    return phases


def mixed_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from a few integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


def _sample_seeds(base: int, indices: np.ndarray) -> np.ndarray:
    """One 63-bit seed per index: splitmix64 of (base + index), vectorised."""
    with np.errstate(over="ignore"):
        z = np.uint64(base) + indices.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)


# Partner draws use their own stream of seeds, apart from the views' augmentation seeds.
_PARTNER_STREAM = 0x5CA7


def check_partner_table(table: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """table as a CPU int64 (n, M) tensor of rows in [0, n), or a ValueError naming what is wrong."""
    if table is None:
        return None
    if table.dim() != 2 or table.shape[0] != n or table.shape[1] < 1:
        raise ValueError(f"partner table: expected ({n}, M >= 1) rows, got shape {tuple(table.shape)}")
    table = table.detach().to("cpu", torch.int64)
    if int(table.min()) < 0 or int(table.max()) >= n:
        raise ValueError(f"partner table: expected rows in [0, {n}), got values in [{int(table.min())}, "
                         f"{int(table.max())}]")
    return table


def check_view_count(count: int, num_views: int) -> int:
    """count if it is an int in [1, num_views], else a ValueError."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= num_views:
        raise ValueError(f"view count: expected an int in [1, {num_views}], got {count!r}")
    return count


def check_clean_views(views: Sequence[int], num_views: int) -> frozenset[int]:
    """views as a set of view numbers in [0, num_views), or a ValueError."""
    if any(not 0 <= v < num_views for v in views):
        raise ValueError(f"clean views: expected view numbers in [0, {num_views}), got {list(views)}")
    return frozenset(views)


def draw_partners(table: torch.Tensor, indices: torch.Tensor, *, seed: int, epoch: int) -> torch.Tensor:
    """(B,) int64 CPU: for each of indices (B,) (CPU), one entry of its row of table (N, M), uniformly,
    from a seed of (seed, epoch, index) alone."""
    rows = indices.numpy()
    columns = _sample_seeds(mixed_seed(seed, epoch, _PARTNER_STREAM), rows) % table.shape[1]
    return table[indices, torch.from_numpy(columns)]


def _check_first_batch(first_batch: int, num_batches: int) -> int:
    if not 0 <= first_batch <= num_batches:
        raise ValueError(f"first_batch: expected 0..{num_batches} (batches per epoch), got {first_batch}")
    return first_batch


def _check_sharding(n: int, *, batch_size_per_rank: int, num_views: int, rank: int, world_size: int,
                    phases: Phases | None = None) -> tuple[int, list | None]:
    """(batches per epoch on each rank, the checked phases), or a ValueError."""
    if batch_size_per_rank < 1:
        raise ValueError(f"batch_size_per_rank: expected >= 1, got {batch_size_per_rank}")
    if num_views < 1:
        raise ValueError(f"num_views: expected >= 1, got {num_views}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    batches = (n // world_size) // batch_size_per_rank
    if batches == 0:
        raise ValueError(f"{n} images on {world_size} rank(s) do not fill one batch of {batch_size_per_rank} "
                         "per rank; lower the batch size")
    phases = check_phases(phases, n, batch_size_per_rank=batch_size_per_rank, world_size=world_size)
    if phases is not None:
        batches = sum((stop - start) // (world_size * batch_size_per_rank) for start, stop in phases)
    return batches, phases


class DeviceTensorLoader:
    """The whole uint8 dataset on `device`, batches gathered and augmented there (BatchAugment)."""

    def __init__(self, data: ImageData, aug: AugmentConfig, *, batch_size_per_rank: int, num_views: int,
                 device: torch.device | str, rank: int, world_size: int, seed: int, phases: Phases | None = None):
        if data.images is None:
            raise ValueError(f"{data.name}: the device loader needs in-memory images (see decode_files)")
        self.num_batches, self.phases = _check_sharding(len(data), batch_size_per_rank=batch_size_per_rank,
                                                        num_views=num_views, rank=rank, world_size=world_size,
                                                        phases=phases)
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.augments = build_batch_augments(aug, num_views=num_views, image_size=data.image_size,
                                             channels=data.channels, mean=data.mean, std=data.std)
        self.clean_view = build_batch_augments(dataclasses.replace(aug, random_views=False), num_views=1,
                                               image_size=data.image_size, channels=data.channels, mean=data.mean,
                                               std=data.std)[0]
        self.clean_views: frozenset[int] = frozenset()
        self.view_count = num_views
        self.batch_size_per_rank = batch_size_per_rank
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.first_batch = 0, 0
        self.partners: torch.Tensor | None = None

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        self.epoch, self.first_batch = epoch, _check_first_batch(first_batch, self.num_batches)

    def set_partners(self, table: torch.Tensor | None) -> None:
        self.partners = check_partner_table(table, len(self.images))

    def set_views(self, count: int) -> None:
        self.view_count = check_view_count(count, len(self.augments))

    def set_clean_views(self, views: Sequence[int]) -> None:
        self.clean_views = check_clean_views(views, len(self.augments))

    def _view_transforms(self) -> list[Callable]:
        """The transforms of this epoch's views, in order (the batches and the skipped draws use the same)."""
        return [self.clean_view if k in self.clean_views else augment
                for k, augment in enumerate(self.augments[:self.view_count])]

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[TrainBatch]:
        order = rank_indices(len(self.images), seed=self.seed, epoch=self.epoch, rank=self.rank,
                             world_size=self.world_size, phases=self.phases,
                             batch_size_per_rank=self.batch_size_per_rank)
        partner_order = None if self.partners is None else draw_partners(
            self.partners, order, seed=self.seed, epoch=self.epoch).to(self.device)
        order = order.to(self.device)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(mixed_seed(self.seed, self.epoch, self.rank))
        size = self.batch_size_per_rank
        self._draw_skipped_params(generator, self.first_batch)
        for b in range(self.first_batch, self.num_batches):
            indices = order[b * size:(b + 1) * size]
            sources = [self.images.index_select(0, indices)]
            partners = None
            if partner_order is not None:
                partners = partner_order[b * size:(b + 1) * size]
                sources.append(self.images.index_select(0, partners))
            views = [transform(sources[k % len(sources)], generator)
                     for k, transform in enumerate(self._view_transforms())]
            yield TrainBatch(views=views, indices=indices, partners=partners)

    def _draw_skipped_params(self, generator: torch.Generator, batches: int) -> None:
        """Advance `generator` past the first `batches` batches of the epoch by drawing their views'
        parameters without touching an image (the draws do not depend on the pixels), so the
        batches after them get the uninterrupted epoch's views. One seed per epoch, not per batch,
        keeps the augmentation stream of runs from before mid-epoch resume."""
        height, width = self.images.shape[2:]
        transforms = self._view_transforms()
        for _ in range(batches):
            for augment in transforms:
                if isinstance(augment, BatchAugment):  # the fixed views draw nothing
                    augment.sample_params(self.batch_size_per_rank, height, width, device=self.device,
                                          generator=generator)


class _EpochShardSampler(torch.utils.data.Sampler):
    """Yields (index, sample seed, partner or -1, clean-view bit mask, view count) for this rank's indices
    of the current epoch, from `first` on. It runs in the main process, so a new partner table, set of
    clean views or view count reaches persistent workers."""

    def __init__(self, n: int, *, seed: int, rank: int, world_size: int, num_views: int, phases: list | None,
                 batch_size_per_rank: int, num_batches: int):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.phases, self.batch_size_per_rank = phases, batch_size_per_rank
        # Rows per epoch: the whole rank's share, or (phases) exactly its whole batches.
        self.per_rank = n // world_size if phases is None else num_batches * batch_size_per_rank
        self.epoch, self.first = 0, 0
        self.partners: torch.Tensor | None = None
        self.clean_views: frozenset[int] = frozenset()
        self.view_count = num_views

    def set_epoch(self, epoch: int, first: int = 0) -> None:
        self.epoch, self.first = epoch, first

    def __len__(self) -> int:
        return self.per_rank - self.first

    def __iter__(self) -> Iterator[tuple[int, int, int, int, int]]:
        order = rank_indices(self.n, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                             phases=self.phases, batch_size_per_rank=self.batch_size_per_rank)[self.first:]
        indices = order.numpy()
        seeds = _sample_seeds(mixed_seed(self.seed, self.epoch), indices)
        partners = ([-1] * len(indices) if self.partners is None
                    else draw_partners(self.partners, order, seed=self.seed, epoch=self.epoch).tolist())
        clean_mask = sum(1 << v for v in self.clean_views)
        count = len(partners)
        return iter(zip(indices.tolist(), seeds.tolist(), partners, [clean_mask] * count, [self.view_count] * count))


class _ViewsDataset(torch.utils.data.Dataset):
    """(row, seed, partner, clean mask, view count) -> (the first `view count` per-sample views, row,
    partner), each sample's randomness seeded by its key; odd-numbered views show the partner row unless
    it is -1, and view k is `clean_transform` of its image where bit k of the mask is set."""

    def __init__(self, data: ImageData, transforms: list[Callable], clean_transform: Callable):
        self.images = data.images
        self.files = data.files
        self.mode = "L" if data.channels == 1 else "RGB"
        self.transforms = transforms
        self.clean_transform = clean_transform

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)

    def _image(self, index: int):
        return self.images[index] if self.images is not None else read_image_file(self.files[index], self.mode)

    def __getitem__(self, key: tuple[int, int, int, int, int]) -> tuple[list[torch.Tensor], int, int]:
        index, sample_seed, partner, clean_mask, view_count = key
        sources = [self._image(index)] + ([] if partner < 0 else [self._image(partner)])

        def views() -> list[torch.Tensor]:
            return [(self.clean_transform if clean_mask >> k & 1 else transform)(sources[k % len(sources)])
                    for k, transform in enumerate(self.transforms[:view_count])]

        if torch.utils.data.get_worker_info() is None:  # in the main process: leave its RNG alone
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                return views(), index, partner
        torch.manual_seed(sample_seed)
        return views(), index, partner


def _ignore_stop_signals(worker_id: int) -> None:
    """In each DataLoader worker: ignore the stop signal (SIGUSR1) that SLURM may send to every
    process of a task. Forked workers inherit the launcher's handler, but spawned ones (spawn and
    forkserver start methods) would die of it, and the trainer with them ("DataLoader worker ...
    killed by signal") instead of stopping at the next step (utils/stop.py)."""
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class WorkersLoader:
    """torch DataLoader with per-sample torchvision v2 views, decoded and augmented in workers."""

    def __init__(self, data: ImageData, aug: AugmentConfig, *, batch_size_per_rank: int, num_views: int,
                 device: torch.device | str, rank: int, world_size: int, seed: int, num_workers: int = 4,
                 phases: Phases | None = None):
        self.num_batches, phases = _check_sharding(len(data), batch_size_per_rank=batch_size_per_rank,
                                                   num_views=num_views, rank=rank, world_size=world_size,
                                                   phases=phases)
        self.device = torch.device(device)
        transforms = [build_sample_transform(aug, image_size=data.image_size, channels=data.channels,
                                             mean=data.mean, std=data.std, view=k % 2) for k in range(num_views)]
        clean = build_sample_transform(dataclasses.replace(aug, random_views=False), image_size=data.image_size,
                                       channels=data.channels, mean=data.mean, std=data.std)
        self.num_views = num_views
        self.sampler = _EpochShardSampler(len(data), seed=seed, rank=rank, world_size=world_size,
                                          num_views=num_views, phases=phases, batch_size_per_rank=batch_size_per_rank,
                                          num_batches=self.num_batches)
        self.loader = torch.utils.data.DataLoader(
            _ViewsDataset(data, transforms, clean), batch_size=batch_size_per_rank, sampler=self.sampler,
            drop_last=True, num_workers=num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(mixed_seed(seed, rank)),  # its base seed, not the global RNG
            worker_init_fn=_ignore_stop_signals)
        self.batch_size_per_rank = batch_size_per_rank

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        first_batch = _check_first_batch(first_batch, self.num_batches)
        self.sampler.set_epoch(epoch, first=first_batch * self.batch_size_per_rank)

    def set_partners(self, table: torch.Tensor | None) -> None:
        self.sampler.partners = check_partner_table(table, self.sampler.n)

    def set_views(self, count: int) -> None:
        self.sampler.view_count = check_view_count(count, self.num_views)

    def set_clean_views(self, views: Sequence[int]) -> None:
        self.sampler.clean_views = check_clean_views(views, self.num_views)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[TrainBatch]:
        for views, indices, partners in self.loader:
            yield TrainBatch(views=[v.to(self.device, non_blocking=True) for v in views],
                             indices=indices.to(self.device, non_blocking=True),
                             partners=None if self.sampler.partners is None
                             else partners.to(self.device, non_blocking=True))


def build_train_loader(data: ImageData, aug: AugmentConfig, *, batch_size_per_rank: int, num_views: int,
                       device: torch.device | str, rank: int, world_size: int, seed: int, mode: str = "auto",
                       num_workers: int = 4, phases: Phases | None = None) -> TrainLoader:
    """The training loader of `mode`: device | workers | auto (device when the images are in memory and
    the augmentation has no per-sample-only step). `phases`: row ranges each epoch visits one after
    another (`rank_indices`), such as CC's STL-10 epoch, unlabeled images first.
    A file-backed dataset in device mode is decoded into memory first (at `data.image_size`); the
    trainer decodes it before (utils.trainer.decode_once), so that its feature passes read
    the same copy."""
    if mode not in LOADER_MODES:
        raise ValueError(f"data.loader: expected one of {', '.join(LOADER_MODES)}, got {mode!r}")
    if mode == "auto":
        mode = "device" if data.images is not None and not aug.per_sample_only else "workers"
    if mode == "device" and aug.per_sample_only:
        raise ValueError("data.loader=device: augment.strong_ops and augment.cutout_size exist only in the per-sample "
                         "pipeline; use data.loader=workers (or auto)")
    common = dict(batch_size_per_rank=batch_size_per_rank, num_views=num_views, device=device, rank=rank,
                  world_size=world_size, seed=seed, phases=phases)
    if mode == "device":
        if data.images is None:
            logger.info("decoding %d files of %s into memory for the device loader", len(data), data.name)
            data = decode_files(data)
        return DeviceTensorLoader(data, aug, **common)
    return WorkersLoader(data, aug, num_workers=num_workers, **common)


class _FilesDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[str], *, image_size: int, channels: int):
        self.files, self.image_size, self.channels = files, image_size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_image_file(self.files[i], image_size=self.image_size, channels=self.channels)


def iterate_shard(data: ImageData, *, batch_size: int, device: torch.device | str, rank: int, world_size: int,
                  num_workers: int = 0, normalize: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test-time pass over this rank's contiguous shard (`shard_bounds`), in dataset order:
    yields (images (B, C, S, S) float32 normalised on `device`, indices (B,) int64 on `device`).
    Deterministic: shorter side resized to S and centre crop (a no-op at native size). It leaves torch's
    global RNG as it found it, so a run draws the same numbers whether a pass ran or came from a cache."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    device = torch.device(device)
    start, stop = shard_bounds(len(data), rank, world_size)
    transform = EvalTransform(image_size=data.image_size, mean=data.mean, std=data.std, normalize=normalize)
    if data.images is not None:
        for first in range(start, stop, batch_size):
            last = min(stop, first + batch_size)
            images = data.images[first:last].to(device, non_blocking=True)
            yield transform(images), torch.arange(first, last, device=device)
        return
    files = _FilesDataset(data.files[start:stop], image_size=data.image_size, channels=data.channels)
    # A DataLoader draws its workers' base seed from the global RNG unless given a generator; the decoding
    # is deterministic, so any fixed seed will do.
    loader = torch.utils.data.DataLoader(files, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    first = start
    for images in loader:
        last = first + len(images)
        yield transform(images.to(device, non_blocking=True)), torch.arange(first, last, device=device)
        first = last
