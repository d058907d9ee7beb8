"""YAML -> typed dataclasses, validated once.

A config file is a mapping of sections (`run`, `data`, `augment`, `model`, `method`, `optim`,
`train`, `cluster`, `eval`, `logging`). A file may extend another with `base: other.yml` (a path
relative to the file), or several with `base: [a.yml, b.yml]` (merged left to right); its keys are
merged over the bases', section by section. Dotted command-line overrides (`train.epochs=2`) are applied
to the merged mapping and go through the same validation.

Every key is checked against the dataclass fields of its section: an unknown key is an error with a
suggestion, scalars are coerced to the field's type (PyYAML reads `1e-4` as a string), and each
section's `validate()` runs cross-field checks. The `method` section is typed by the options class
of the method it names (`method.name`), so each method owns its own schema.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A one-line description of what is wrong with a config, naming the key."""


# --------------------------------------------------------------------------------------- sections
@dataclass(kw_only=True)
class RunConfig:
    name: str = ""              # run directory name under output_dir; "" = the config file's stem
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"        # auto (CUDA when present) | cpu | cuda
    threads_per_rank: int = 0   # CPU threads per process; 0 = available cores / processes on this node
    # cuDNN times its convolution algorithms for each new input shape and keeps the fastest (CUDA only;
    # the training shapes are fixed); off under `deterministic`
    cudnn_benchmark: bool = True
    # bit-identical repeats on the same machine, device and thread count: torch's deterministic
    # algorithms (ops that have none warn) and cuBLAS's fixed workspace; threaded CPU sums otherwise
    # differ from run to run in the last bits
    deterministic: bool = False

    def validate(self) -> None:
        _check_choice("run.device", self.device, ("auto", "cpu", "cuda"))
        _check_min("run.threads_per_rank", self.threads_per_rank, 0)
        _check_min("run.seed", self.seed, 0)   # numpy's generators take no negative seed


@dataclass(kw_only=True)
class ModelConfig:
    backbone: str = "resnet18_cifar"   # backbone registry name (models/backbones.py)
    # batch | sync_batch (SyncBN across ranks, CUDA only; one process runs it as batch) | none (exact-gradient tests)
    norm: str = "batch"
    channels_last: bool = False        # memory format for conv backbones (faster on GPUs and often on CPUs)

    def validate(self) -> None:
        _check_choice("model.norm", self.norm, ("batch", "sync_batch", "none"))


OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")   # what utils.optim.build_optimizer builds


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "sgd"                  # sgd | adamw | adam | rmsprop
    lr: float = 0.05                   # base learning rate for a global batch of `lr_reference_batch`
    lr_reference_batch: int = 256      # lr is scaled by global_batch / lr_reference_batch; 0 = no scaling
    weight_decay: float = 5e-4
    momentum: float = 0.9              # SGD/LARS momentum
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam(W)
    warmup_epochs: float = 0.0         # linear warm-up of the lr from 0, per iteration
    schedule: str = "cosine"           # cosine | constant
    min_lr: float = 0.0                # end of the cosine, as an absolute lr
    grad_clip_norm: float = 0.0        # 0 = off

    def validate(self) -> None:
        _check_choice("optim.name", self.name, OPTIMIZERS)
        _check_choice("optim.schedule", self.schedule, ("cosine", "constant"))
        _check_min("optim.lr", self.lr, 0.0)
        _check_min("optim.weight_decay", self.weight_decay, 0.0)
        _check_min("optim.warmup_epochs", self.warmup_epochs, 0.0)
        _check_min("optim.lr_reference_batch", self.lr_reference_batch, 0)
        _check_min("optim.min_lr", self.min_lr, 0.0)
        _check_min("optim.grad_clip_norm", self.grad_clip_norm, 0.0)
        check_momentum("optim.momentum", self.momentum)
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: expected two numbers, got {self.betas}")
        for i, beta in enumerate(self.betas):
            check_momentum(f"optim.betas[{i}]", beta)


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 100
    batch_size_per_rank: int = 128
    amp: str = "none"                  # none | bf16 | fp16 (autocast; fp16 adds a grad scaler; both run on CPUs too)
    log_every_steps: int = 50
    save_every_epochs: int = 1
    max_steps_per_epoch: int = 0       # >0: cut epochs short (debugging, tests)
    time_budget_minutes: float = 0.0   # >0: stop after the epoch that crosses this wall-clock budget
    save_every_minutes: float = 0.0    # >0: also save last.pt mid-epoch once this long since the last save

    def validate(self) -> None:
        _check_min("train.epochs", self.epochs, 1)
        _check_min("train.batch_size_per_rank", self.batch_size_per_rank, 1)
        _check_choice("train.amp", self.amp, ("none", "bf16", "fp16"))
        _check_min("train.log_every_steps", self.log_every_steps, 1)
        _check_min("train.save_every_epochs", self.save_every_epochs, 1)
        _check_min("train.max_steps_per_epoch", self.max_steps_per_epoch, 0)
        _check_min("train.time_budget_minutes", self.time_budget_minutes, 0.0)
        _check_min("train.save_every_minutes", self.save_every_minutes, 0.0)


@dataclass(kw_only=True)
class ClusterConfig:
    """k-means of the EM loop (pseudo-labels for methods that use them)."""
    every_epochs: int = 1              # re-cluster the whole dataset every this many epochs
    num_clusters: int = 0              # 0 = the dataset's number of classes
    metric: str = "cosine"             # cosine (spherical k-means) | euclidean
    n_init: int = 3
    max_iter: int = 300
    tol: float = 1e-4
    extract_batch_size: int = 512      # per rank, for the feature-extraction pass

    def validate(self) -> None:
        _check_min("cluster.every_epochs", self.every_epochs, 1)
        _check_min("cluster.num_clusters", self.num_clusters, 0)
        _check_choice("cluster.metric", self.metric, ("cosine", "euclidean"))
        _check_min("cluster.n_init", self.n_init, 1)
        _check_min("cluster.max_iter", self.max_iter, 1)
        _check_min("cluster.tol", self.tol, 0.0)
        _check_min("cluster.extract_batch_size", self.extract_batch_size, 1)


@dataclass(kw_only=True)
class EvalConfig:
    every_epochs: int = 1              # NMI / ACC / ARI every this many epochs (and after the last)
    features: str = ""                 # which features k-means clusters; "" = the method's default
    num_clusters: int = 0              # 0 = the dataset's number of classes
    # k-means++ restarts of the read-out. 10, not the E-step's 3: the reported score must not hinge on
    # one unlucky draw (the demo's final features: 3 restarts with seed 0 all merged two digits,
    # inertia 710 and ACC 0.833, where 10 restarts found inertia 639 and ACC 0.972 for seeds 0, 1, 2).
    n_init: int = 10
    max_iter: int = 300
    best_metric: str = "acc"           # which metric picks best.pt: acc | nmi | ari | knn_acc (needs knn_every_epochs)
    # kNN monitor: weighted kNN top-1 (cosine, exp(sim / T) votes) of the eval set against the training
    # set's labelled rows, on the `features` above. When both sets are the same rows (train+test
    # protocol) each query leaves itself out of its neighbours.
    knn_every_epochs: int = 0          # 0 = off; logged as eval/knn_acc
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_chunk_size: int = 1024         # queries per similarity block: memory O(chunk x N) on the device
    # Linear evaluation (`main.py CONFIG --eval linear --checkpoint PATH`): a linear classifier on frozen,
    # cached features of the train split, top-1 on the test split (a seeded 80/20 split of the training
    # images when the dataset has no test split).
    linear_features: str = "backbone"  # which features (an eval feature kind of the method)
    linear_epochs: int = 50
    linear_lr: float = 0.01            # Adam
    linear_weight_decay: float = 0.0
    linear_batch_size: int = 1024      # rows per step (the probe runs replicated, not per rank); 0 = full batch
    linear_augment: bool = False       # re-extract the train rows under augment.* every probe epoch (slower)

    def validate(self) -> None:
        _check_min("eval.every_epochs", self.every_epochs, 1)
        _check_min("eval.num_clusters", self.num_clusters, 0)
        _check_min("eval.n_init", self.n_init, 1)
        _check_min("eval.max_iter", self.max_iter, 1)
        _check_choice("eval.best_metric", self.best_metric, ("acc", "nmi", "ari", "knn_acc"))
        if self.best_metric == "knn_acc" and not self.knn_every_epochs:
            raise ConfigError("eval.best_metric: knn_acc needs the kNN monitor on (eval.knn_every_epochs > 0)")
        _check_min("eval.knn_every_epochs", self.knn_every_epochs, 0)
        _check_min("eval.knn_k", self.knn_k, 1)
        if not self.knn_temperature > 0:
            raise ConfigError(f"eval.knn_temperature: expected a value > 0, got {self.knn_temperature!r}")
        _check_min("eval.knn_chunk_size", self.knn_chunk_size, 1)
        _check_min("eval.linear_epochs", self.linear_epochs, 1)
        if not self.linear_lr > 0:
            raise ConfigError(f"eval.linear_lr: expected a value > 0, got {self.linear_lr!r}")
        _check_min("eval.linear_weight_decay", self.linear_weight_decay, 0.0)
        _check_min("eval.linear_batch_size", self.linear_batch_size, 0)


@dataclass(kw_only=True)
class LoggingConfig:
    wandb: bool = False                # initialised on rank 0 only; WANDB_MODE=offline works without a network
    wandb_project: str = "deep-clustering"
    wandb_entity: str = ""
    progress_bar: bool = True          # tqdm on rank 0

    def validate(self) -> None:
        pass


def _section_types() -> dict[str, type]:
    # Imported here so that `utils.config` stays importable without torch-heavy packages.
    from data.config import AugmentConfig, DataConfig
    return {
        "run": RunConfig, "data": DataConfig, "augment": AugmentConfig, "model": ModelConfig,
        "optim": OptimConfig, "train": TrainConfig, "cluster": ClusterConfig, "eval": EvalConfig,
        "logging": LoggingConfig,
    }


@dataclass(kw_only=True)
class Config:
    run: RunConfig
    data: Any          # data.config.DataConfig
    augment: Any       # data.config.AugmentConfig
    model: ModelConfig
    method: Any        # the options dataclass of the named method; has a `name` field
    optim: OptimConfig
    train: TrainConfig
    cluster: ClusterConfig
    eval: EvalConfig
    logging: LoggingConfig
    source: str = ""   # the file it was read from

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (YAML- and `torch.load(weights_only=True)`-safe)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTION_ORDER}
        return out


SECTION_ORDER = ("run", "data", "augment", "model", "method", "optim", "train", "cluster", "eval", "logging")


# ----------------------------------------------------------------------------------------- loading
def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (following `base:` links), apply `key=value` overrides, validate, type it."""
    raw = read_yaml_with_bases(Path(path))
    for item in overrides:
        apply_override(raw, item)
    if "method" not in raw:  # e.g. config/base/data_imagenet10.yml run as it is
        raise ConfigError(f"method.name: required, and {path} names no method (with its bases): a fragment such as "
                          "config/base/*.yml goes in the base: list of a config that names one")
    cfg = build_config(raw)
    cfg.source = str(path)
    # resolved here, so that a printed or saved config (a run's config.yml) names the same run directory
    # when it is run again from another file name
    cfg.run.name = cfg.run.name or Path(path).stem
    return cfg


def read_yaml_with_bases(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve() if path.exists() else path
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in _seen:
        raise ConfigError(f"{path}: circular 'base' chain through {' -> '.join(map(str, _seen))}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}  # UTF-8 whatever the locale says
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: expected UTF-8 text, got byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    # a list of bases is merged left to right: a method's settings, then a dataset's (config/base/data_*.yml)
    bases = base if isinstance(base, list) else [base]
    if not bases or not all(isinstance(name, str) and name for name in bases):
        raise ConfigError(f"{path}: base: expected a file name or a list of file names, got {base!r}")
    merged: dict[str, Any] = {}
    for name in bases:
        merged = deep_merge(merged, read_yaml_with_bases(path.parent / name, _seen + (path,)))
    return deep_merge(merged, raw)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (`2`, `1e-4`, `[1, 2]`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    dotted, _, text = item.partition("=")
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"override {item!r}: expected section.key=value (e.g. train.epochs=2)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def build_config(raw: dict[str, Any]) -> Config:
    from models import method_config_class

    sections = _section_types()
    unknown = [k for k in raw if k not in sections and k != "method"]
    if unknown:
        raise ConfigError(_unknown_key_message(unknown[0], list(sections) + ["method", "base"]))
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        built[name] = build_section(cls, raw.get(name) or {}, name)
    method_raw = dict(raw.get("method") or {})
    if not isinstance(method_raw, dict) or "name" not in method_raw:
        raise ConfigError("method.name: required (the registered method to train, e.g. propos)")
    try:
        method_cls = method_config_class(str(method_raw["name"]))
    except ValueError as exc:
        raise ConfigError(f"method.name: {exc}") from None
    built["method"] = build_section(method_cls, method_raw, "method")
    cfg = Config(**built)
    validate_cross_fields(cfg)
    return cfg


def build_section(cls: type, values: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, coercing types; errors name `prefix.key`."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(f"{prefix}.{key}", list(fields), short=str(key)))
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}")
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix}: {exc}") from None
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return obj


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Coerce a YAML value to a field annotation (bool, int, float, str, list[...], X | None)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return coerce(value, options[0], key)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        if isinstance(value, (list, tuple)):
            return [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # NaN passes every `<` check below it, and no setting means infinity
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def validate_cross_fields(cfg: Config) -> None:
    """Checks that involve more than one section; run once at load time."""
    # The method decides which registry its backbone comes from (DEC/IDEC: autoencoders). Checked
    # here, so that a typo is not found only after the dataset has loaded.
    backbones = cfg.method.backbone_registry()
    if cfg.model.backbone not in backbones:
        try:
            backbones.get(cfg.model.backbone)
        except ValueError as exc:
            raise ConfigError(f"model.backbone: {exc} (method {cfg.method.name!r})") from None
    if cfg.eval.features and hasattr(cfg.method, "eval_feature_choices"):
        choices = cfg.method.eval_feature_choices()
        if cfg.eval.features not in choices:
            raise ConfigError(f"eval.features: expected one of {', '.join(choices)} for method "
                              f"{cfg.method.name!r}, got {cfg.eval.features!r}")
    if hasattr(cfg.method, "eval_feature_choices"):
        choices = cfg.method.eval_feature_choices()
        if cfg.eval.linear_features not in choices:
            raise ConfigError(f"eval.linear_features: expected one of {', '.join(choices)} for method "
                              f"{cfg.method.name!r}, got {cfg.eval.linear_features!r}")


def _unknown_key_message(key: str, known: list[str], short: str | None = None) -> str:
    """`key` is the full dotted key; `short` its last part, matched against the section's `known` names.
    The suggestion is a full key too, so it can be pasted back as an override."""
    name = short if short is not None else key
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    prefix = key[: len(key) - len(name)]
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
    return f"unknown key {key!r}{hint}"


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")


def _check_min(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(f"{key}: expected a value >= {minimum}, got {value!r}")


def check_momentum(key: str, value: float) -> None:
    """A momentum or an Adam beta: a decay factor in [0, 1) (1 would never forget, above 1 diverges)."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{key}: expected a value in [0, 1), got {value!r}")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested config dict keyed by its dotted (override) keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two `Config.to_dict()` trees (a checkpoint's and this
    run's), as "key: saved -> current" in the order of `current`; a key one of them lacks (a
    checkpoint from an older version) shows as absent."""
    old, new = flatten(saved), flatten(current)
    missing = object()

    def shown(tree: dict[str, Any], key: str) -> str:
        return repr(tree[key]) if key in tree else "(absent)"

    return [f"{key}: {shown(old, key)} -> {shown(new, key)}" for key in [*new, *(k for k in old if k not in new)]
            if old.get(key, missing) != new.get(key, missing)]


def format_config(cfg: Config) -> str:
    """The resolved config (after bases and overrides) as YAML that `load_config` reads back to `cfg`."""
    # Non-ASCII text is escaped ("\xE9"): the same bytes in config.yml and on --print-config's stdout,
    # which an ASCII locale could not print otherwise.
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_resolved_config(cfg: Config, path: Path) -> None:
    """Write `format_config(cfg)` to `path`, atomically."""
    from utils.checkpoint import write_text_atomic

    write_text_atomic(path, format_config(cfg))
