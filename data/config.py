"""Typed configuration of the data axis: which images (`DataConfig`) and how they are augmented (`AugmentConfig`).

The framework's YAML loader builds these keyword-only dataclasses (unknown keys are errors, scalars are
coerced to the annotated type); `validate()` runs once at load time and raises a one-line `ValueError`
naming the offending key.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "test", "train+test")
LOADER_MODES = ("device", "workers", "auto")


def _fail(key: str, message: str) -> None:
    raise ValueError(f"{key}: {message}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, f"expected one of {', '.join(choices)}, got {value!r}")


def _check_probability(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        _fail(key, f"expected a probability in [0, 1], got {value!r}")


def _check_pair(key: str, values: list[float]) -> None:
    if len(values) != 2:
        _fail(key, f"expected a list of two numbers, got {values!r}")


@dataclass(kw_only=True)
class DataConfig:
    """Which images are trained on and clustered.

    The clustering protocol of ProPos/CC/DAC trains and scores on `train+test`; SCAN/NNM train on
    `train` and score on `test` (set `eval_split`).
    """

    name: str = "mnist_5k"  # dataset registry name (data.datasets.DATASETS)
    root: str = ""  # folder or file; "" = the dataset's default (the shared offline copy if present, else ./datasets)
    split: str = "train+test"  # what is trained on and clustered: train | test | train+test (rows: train then test)
    eval_split: str = ""  # "" = same as split
    download: bool = False  # let torchvision download the files into root (only when true)
    image_size: int = 0  # side of the images the pipelines produce; 0 = native size (imagefolder: the first image's shorter side)
    cifar100_superclasses: bool = True  # cifar100: the 20 superclasses of the clustering protocol (false: 100 fine classes)
    classes: list[str] = field(default_factory=list)  # imagefolder: class folders to keep, in label order; empty = all, sorted
    stl10_unlabeled: bool = False  # stl10: append the 100k unlabeled images (label -1) to the TRAINING set only
    loader: str = "auto"  # device | workers | auto (device when the images are an in-memory uint8 tensor)
    num_workers: int = 4  # DataLoader processes of the workers loader (and of file decoding at evaluation)
    # Image files: decode each once, at image_size, when the run starts, and keep that copy (N x C x S^2 bytes
    # per rank) for every feature pass (k-means, evaluation, mining, DEC's targets), which would otherwise
    # decode every file again. Exact: the passes' own decoding. Training through the workers loader still
    # reads the files (its crops need the whole image); data.loader=device trains on the copy, so always keeps it.
    decode_once: bool = False
    # >0: keep only `limit` images of each built set (debugging, reduced-size runs): its first rows, or, for
    # sets stored class by class (mnist_5k, imagefolder), the first of each class in turn, so every class stays
    limit: int = 0

    @property
    def resolved_eval_split(self) -> str:
        return self.eval_split or self.split

    def validate(self) -> None:
        if not self.name:
            _fail("data.name", "must not be empty")
        _check_choice("data.split", self.split, SPLITS)
        if self.eval_split:
            _check_choice("data.eval_split", self.eval_split, SPLITS)
        _check_choice("data.loader", self.loader, LOADER_MODES)
        if self.image_size < 0:
            _fail("data.image_size", f"expected 0 (native) or a positive size, got {self.image_size}")
        if self.num_workers < 0:
            _fail("data.num_workers", f"expected >= 0, got {self.num_workers}")
        if self.limit < 0:
            _fail("data.limit", f"expected 0 (all) or a positive count, got {self.limit}")
        if len(set(self.classes)) != len(self.classes):
            _fail("data.classes", f"lists a class twice: {self.classes!r}")
        if self.classes and self.name != "imagefolder":
            _fail("data.classes", f"only the imagefolder dataset selects classes, not {self.name!r}")
        if self.stl10_unlabeled and self.name != "stl10":
            _fail("data.stl10_unlabeled", f"only stl10 has unlabeled images, not {self.name!r}")


@dataclass(kw_only=True)
class AugmentConfig:
    """SimCLR/BYOL-style random views. Two-element lists hold per-view values (view 1, view 2) for the
    asymmetric BYOL transform; the other values are shared by all views.

    Order of the ops (batched and per-sample paths alike): random resized crop -> horizontal flip ->
    random affine -> elastic distortion -> [strong ops] -> colour jitter (brightness, contrast, saturation,
    hue, in that fixed order) -> grayscale -> Gaussian blur -> solarize -> normalise -> [Cutout]; the two
    bracketed steps exist only per sample (the workers loader).
    """

    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # area fraction of the random crop
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])  # aspect ratio (w/h) of the crop
    hflip_p: float = 0.5
    jitter_p: float = 0.8  # probability of applying the colour jitter
    brightness: float = 0.4  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # hue shift drawn from [-hue, hue], in turns (<= 0.5)
    grayscale_p: float = 0.2
    blur_p: list[float] = field(default_factory=lambda: [0.0, 0.0])  # per view; kernel ~10% of the image side, odd
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # range of sigma, pixels
    solarize_p: list[float] = field(default_factory=lambda: [0.0, 0.0])  # per view; threshold 0.5
    affine_degrees: float = 0.0  # strong random affine (MNIST): rotation drawn from [-d, d] degrees
    affine_translate: float = 0.0  # translation up to this fraction of the side, each axis
    affine_shear: float = 0.0  # x-shear drawn from [-s, s] degrees
    elastic_p: float = 0.0  # elastic distortion (MNIST)
    elastic_alpha: float = 0.0  # displacement magnitude, pixels, as torchvision's ElasticTransform
    elastic_sigma: float = 4.0  # smoothness of the displacement field, pixels
    normalize: bool = True  # subtract the dataset mean, divide by its std
    # false: no augmentation at all, every view is the image itself (the evaluation transform: resized and
    # centre-cropped to image_size when needed; pixels in [0, 1] unless normalize), e.g. DEC/IDEC's input
    random_views: bool = True
    # SCAN's strong views (per-sample ops: the workers loader): this many random ops at random magnitudes
    # (data.augment.STRONG_OPS) after the geometry, and one Cutout hole of side 1..cutout_size after
    # normalising (SCAN: 4 ops; holes up to 16 px on CIFAR, 32 on STL-10). 0 = off.
    strong_ops: int = 0
    cutout_size: int = 0

    @property
    def per_sample_only(self) -> bool:
        """Whether some step exists only in the per-sample pipeline (the workers loader)."""
        return self.random_views and bool(self.strong_ops or self.cutout_size)

    def validate(self) -> None:
        for key in ("crop_scale", "crop_ratio", "blur_p", "blur_sigma", "solarize_p"):
            _check_pair(f"augment.{key}", getattr(self, key))
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            _fail("augment.crop_scale", f"expected 0 < min <= max <= 1, got {self.crop_scale!r}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            _fail("augment.crop_ratio", f"expected 0 < min <= max, got {self.crop_ratio!r}")
        for key in ("hflip_p", "jitter_p", "grayscale_p", "elastic_p"):
            _check_probability(f"augment.{key}", getattr(self, key))
        for key in ("blur_p", "solarize_p"):
            for value in getattr(self, key):
                _check_probability(f"augment.{key}", value)
        for key in ("brightness", "contrast", "saturation"):
            if getattr(self, key) < 0.0:
                _fail(f"augment.{key}", f"expected >= 0, got {getattr(self, key)!r}")
        if not 0.0 <= self.hue <= 0.5:
            _fail("augment.hue", f"expected a value in [0, 0.5], got {self.hue!r}")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            _fail("augment.blur_sigma", f"expected 0 < min <= max, got {self.blur_sigma!r}")
        if not 0.0 <= self.affine_degrees <= 180.0:
            _fail("augment.affine_degrees", f"expected a value in [0, 180], got {self.affine_degrees!r}")
        if not 0.0 <= self.affine_translate <= 1.0:
            _fail("augment.affine_translate", f"expected a fraction in [0, 1], got {self.affine_translate!r}")
        if not 0.0 <= self.affine_shear < 90.0:
            _fail("augment.affine_shear", f"expected degrees in [0, 90), got {self.affine_shear!r}")
        if self.elastic_alpha < 0.0:
            _fail("augment.elastic_alpha", f"expected >= 0, got {self.elastic_alpha!r}")
        if self.elastic_sigma <= 0.0:
            _fail("augment.elastic_sigma", f"expected > 0, got {self.elastic_sigma!r}")
        for key in ("strong_ops", "cutout_size"):
            if getattr(self, key) < 0:
                _fail(f"augment.{key}", f"expected 0 (off) or a positive count, got {getattr(self, key)!r}")
