"""Train a clustering method from a YAML config.

    python main.py config/mnist_cnn_propos.yml                     # one process (CPU or one GPU)
    python main.py config/mnist_cnn_propos.yml train.epochs=2      # dotted overrides, validated like the YAML
    torchrun --nproc_per_node=4 main.py config/cifar10_r18_propos.yml
    python main.py CONFIG --resume auto                            # continue the newest checkpoint of the run
    python main.py CONFIG [overrides] --print-config               # the resolved config as YAML, then exit
    python main.py CONFIG --eval linear --checkpoint runs/x/last.pt  # evaluate only: cluster | assign | knn | linear
                                                                     # | features (export them), or several:
                                                                     # --eval cluster,knn,features
    srun python main.py CONFIG                                     # SLURM, one task per GPU (see scripts/)
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

log = logging.getLogger("main")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file (config/*.yml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=2")
    parser.add_argument("--resume", default="", help="checkpoint path, or 'auto' for the newest in the run directory")
    parser.add_argument("--eval", default="", metavar="MODE[,MODE...]",
                        help="evaluate --checkpoint instead of training: cluster (NMI/ACC/ARI), assign (the "
                             "images to the checkpoint's clusters: its k-means centroids or its head), knn "
                             "(weighted kNN top-1, eval.knn_*), linear (linear probe, eval.linear_*) or features "
                             "(CHECKPOINT.features.npz: eval.features of every image); writes "
                             "CHECKPOINT.eval_MODE.json. Several modes, comma-separated, run in that order on "
                             "one loaded model and share its feature extraction")
    parser.add_argument("--checkpoint", default="", help="the checkpoint --eval reads (never modified)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config after its bases and overrides (validated; a file main.py reads "
                             "back as it is) and exit without touching data or run directories")
    # Intermixed: overrides may also follow the options (`CONFIG --resume auto train.epochs=200`),
    # which plain parse_args rejects as unrecognized arguments.
    return parser.parse_intermixed_args(argv)


EVAL_MODES = ("cluster", "assign", "knn", "linear", "features")
# Modes that need no labels: they write what the model makes of each image.
UNLABELED_MODES = ("cluster", "assign", "features")
# The modes that write each image's cluster, and where (beside the checkpoint, as this suffix).
CLUSTER_CSV_SUFFIX = {"cluster": ".clusters.csv", "assign": ".assigned.csv"}


def seed_everything(seed: int, rank: int) -> None:
    # Different streams per rank (latent noise, augmentations); DDP broadcasts rank 0's initial weights.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def prepare_run_dir(cfg, resume: str) -> Path:
    """The run directory; refuse to write over an earlier run's checkpoints unless resuming."""
    from utils.checkpoint import find_latest_checkpoint

    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if not resume and find_latest_checkpoint(run_dir) is not None:
        raise SystemExit(f"error: run directory {run_dir} already holds checkpoints; pass --resume auto to "
                         f"continue that run, or choose another run.name=...")
    return run_dir


def refuse_unwritable_folder(folder: Path, dist_info, what: str) -> None:
    """A one-line SystemExit, "error: `what` (why)", on every rank where rank 0, the one that writes into
    `folder`, could not create or write it: the folder nearest to it that exists is a file, or not writable
    (a read-only mount, another user's folder). Checked before the data load, which can take minutes.
    Collective."""
    from utils import distributed as du

    problem = None
    if dist_info.is_main:  # rank 0 only: the rank that will write there
        nearest = next(p for p in [folder, *folder.parents] if p.exists())
        if not nearest.is_dir():
            problem = f"{nearest} is not a folder"
        elif not os.access(nearest, os.W_OK | os.X_OK):
            problem = f"{nearest} is not writable"
    problem = du.broadcast_object(problem)
    if problem is not None:
        raise SystemExit(f"error: {what} ({problem})")


class Datasets(NamedTuple):
    """The run's datasets: `train` feeds training and the EM loop, `eval` the NMI / ACC / ARI
    (the same object when the configured splits give the same rows)."""
    train: Any
    eval: Any


def start_distributed(cfg):
    """`utils.distributed.init_distributed` for the config's run section, torch's deterministic mode
    (`run.deterministic`) and cuDNN's benchmark mode (`run.cudnn_benchmark`); a device this machine
    lacks (run.device=cuda without a usable GPU) is a one-line error, before anything is written."""
    from utils import distributed as du

    if cfg.run.deterministic:   # read by cuBLAS when CUDA starts: repeatable GPU matrix products
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        info = du.init_distributed(cfg.run.device, cfg.run.threads_per_rank)
    except du.DeviceUnavailableError as exc:
        raise SystemExit(f"error: {exc}; use run.device=auto or cpu") from None
    # both ways, so that runs in one process (tests, notebooks) do not inherit each other's setting
    torch.use_deterministic_algorithms(cfg.run.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark and not cfg.run.deterministic
    return info


def build_datasets(cfg) -> Datasets:
    """The train and eval datasets from the config; a missing or malformed dataset is a one-line error.
    Collective in a distributed run: sets held in memory are loaded by one rank per node, into one copy
    its ranks share (`utils.trainer.load_once_per_node`).

    Called before the run directory is created, so that bad data never leaves a run directory behind."""
    from data.datasets import FILE_BACKED_DATASETS, build_eval_dataset, build_train_dataset, empty_images
    from utils.trainer import load_once_per_node

    same_rows = cfg.data.resolved_eval_split == cfg.data.split and not cfg.data.stl10_unlabeled
    builds = [lambda allocate: build_train_dataset(cfg.data, allocate)] + (
        [] if same_rows else [lambda allocate: build_eval_dataset(cfg.data, allocate)])
    try:
        sets = ([build(empty_images) for build in builds] if cfg.data.name in FILE_BACKED_DATASETS
                else load_once_per_node(builds))
        return Datasets(sets[0], sets[-1])
    except (OSError, ValueError, ModuleNotFoundError) as exc:  # OSError: FileNotFoundError, PermissionError, ...
        raise SystemExit(f"error: data: {exc}") from None


class Checkpoint(NamedTuple):
    """A checkpoint read (and checked) by `read_checkpoint`: where it came from and its state dict."""
    path: Path
    state: dict


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at `path`; a missing, truncated or foreign file is a one-line error. Only reads."""
    from utils.checkpoint import load_checkpoint

    try:
        return Checkpoint(path, load_checkpoint(path, map_location="cpu"))
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


def find_resume_point(run_dir: Path, resume: str) -> Checkpoint | None:
    """The checkpoint `--resume` names (a path, or "auto": the newest in `run_dir`), read and checked;
    None when not resuming, or when "auto" finds no checkpoint yet."""
    from utils.checkpoint import find_latest_checkpoint

    if not resume:
        return None
    path = find_latest_checkpoint(run_dir) if resume == "auto" else Path(resume)
    return None if path is None else read_checkpoint(path)


def build_trainer(cfg, dist_info, run_dir: Path, writer, datasets: Datasets, weights: Checkpoint | None = None):
    """Method (with the model weights of `weights`, if given, for evaluation: its per-image training
    state is left out, so the data may be other images) and the Trainer, from the config and
    `datasets` = build_datasets(cfg). What the config asks of the data or the checkpoint that they
    cannot give (a batch larger than the data, another model's weights) is a one-line error."""
    from data.datasets import extra_training_rows
    from models import DataInfo, build_method
    from utils.checkpoint import load_model_state
    from utils.trainer import Trainer, resolve_num_clusters

    train_data, eval_data = datasets.train, datasets.eval
    try:
        num_clusters = resolve_num_clusters(cfg, train_data)
        method = build_method(cfg.method, backbone=cfg.model.backbone, norm=cfg.model.norm,
                              data=DataInfo(in_channels=train_data.channels, image_size=train_data.image_size,
                                            num_classes=train_data.num_classes, num_samples=len(train_data),
                                            num_clusters=num_clusters,
                                            num_extra_rows=extra_training_rows(cfg.data, train_data)))
        if weights is not None:
            state = dict(weights.state["model"])
            for name in method.per_sample_buffers:  # the data evaluated may have another N than the training's
                state[name] = method.get_buffer(name)
            load_model_state(method, state, weights.path)
        return Trainer(cfg, method, train_data, eval_data, dist_info=dist_info, run_dir=run_dir, writer=writer,
                       evaluate_only=weights is not None)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def parse_eval_modes(value: str) -> tuple[str, ...]:
    """--eval's value: one mode, or several comma-separated (`cluster,knn,features`), which then run in
    that order on one loaded model and share its feature extraction."""
    modes = tuple(value.split(","))
    for mode in modes:
        if mode not in EVAL_MODES:
            raise SystemExit(f"error: --eval: expected one of {', '.join(EVAL_MODES)}, or several comma-separated, "
                             f"got {mode!r}")
    repeated = [mode for i, mode in enumerate(modes) if mode in modes[:i]]
    if repeated:
        raise SystemExit(f"error: --eval: {repeated[0]} appears twice in {value!r}; each mode runs once")
    return modes


def check_eval_args(args: argparse.Namespace) -> tuple[tuple[str, ...], Path]:
    """(the --eval modes, the --checkpoint path), or a one-line error."""
    modes = parse_eval_modes(args.eval)
    if args.resume:
        raise SystemExit("error: --eval evaluates a checkpoint and never trains; drop --resume")
    if not args.checkpoint:
        raise SystemExit("error: --eval needs --checkpoint PATH")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise SystemExit(f"error: --checkpoint: no such file {checkpoint}")
    return modes, checkpoint


def readout_summary(readout: dict) -> dict:
    """What a checkpoint's k-means read-out was fitted with: {features, metric, num_clusters}."""
    return {"features": readout["features"], "metric": readout["metric"],
            "num_clusters": int(readout["centroids"].shape[0])}


def check_assign_overrides(cfg, readout: dict, checkpoint: Path) -> None:
    """--eval assign puts images into the checkpoint's k-means clusters, on the features and with the
    metric those were fitted with: an eval.features or eval.num_clusters that asks for others is a
    one-line error rather than silently not applied."""
    fitted = readout_summary(readout)
    asked = [f"eval.{key}={value}" for key, value in (("features", cfg.eval.features),
                                                      ("num_clusters", cfg.eval.num_clusters))
             if value and value != fitted[key]]
    if asked:
        raise SystemExit(f"error: --eval assign: {' '.join(asked)}, but {checkpoint}'s k-means read-out has "
                         f"{fitted['num_clusters']} clusters of {fitted['features']} features ({fitted['metric']}); "
                         "assign uses those (drop the override), --eval cluster fits k-means again")


def run_evaluation(cfg, modes: tuple[str, ...], checkpoint: Path) -> dict:
    """Evaluate a checkpoint's model (read-only, weights_only) in each of `modes`, in order, and write
    CHECKPOINT.eval_MODE.json for each. Every precondition of every mode is checked before the first
    runs; the modes share one model and its extracted features. Returns the results of the one mode,
    or {mode: results} for several."""
    from data.datasets import UnreadableImageError
    from utils import distributed as du
    from utils.logger import setup_logging

    weights = read_checkpoint(checkpoint)
    if "assign" in modes and weights.state.get("readout") is not None:
        check_assign_overrides(cfg, weights.state["readout"], checkpoint)
    dist_info = start_distributed(cfg)
    setup_logging(dist_info.rank, None)
    refuse_unwritable_folder(checkpoint.parent, dist_info, f"--eval: cannot write its results beside {checkpoint}")
    seed_everything(cfg.run.seed, dist_info.rank)
    datasets = build_datasets(cfg)
    labelled = [mode for mode in modes if mode not in UNLABELED_MODES]
    if labelled and not (datasets.train.has_labels and datasets.eval.has_labels):
        raise SystemExit(f"error: --eval {labelled[0]}: needs labels, and {datasets.train.name} has none "
                         "(--eval cluster|assign|features write the clusters or features of unlabeled data)")
    trainer = build_trainer(cfg, dist_info, checkpoint.parent, None, datasets, weights=weights)
    if "cluster" in modes:
        k = trainer.num_clusters(cfg.eval.num_clusters)
        if not trainer.method.has_head and k > len(datasets.eval):  # k-means of the images evaluated
            raise SystemExit(f"error: --eval cluster: eval.num_clusters: {k} clusters, but the data have only "
                             f"{len(datasets.eval)} images (--eval assign puts them into the checkpoint's clusters)")
    if "assign" in modes and not trainer.method.has_head and weights.state.get("readout") is None:
        raise SystemExit(f"error: --eval assign: {checkpoint} has no k-means read-out to assign to (a checkpoint "
                         "keeps the one fitted with its weights: use best.pt, or a last.pt saved at an "
                         "evaluation; --eval cluster fits k-means again)")
    try:
        results = {mode: evaluate_checkpoint(cfg, mode, trainer, weights, datasets.eval) for mode in modes}
    except UnreadableImageError as exc:  # the images are decoded as the passes reach them
        raise SystemExit(f"error: {exc.one_line}") from None
    du.cleanup_distributed()
    return results[modes[0]] if len(modes) == 1 else results


def evaluate_checkpoint(cfg, mode: str, trainer, weights: Checkpoint, eval_data) -> dict:
    """One --eval mode of `weights`' model, loaded in `trainer` (whose checks `run_evaluation` made):
    its results, also written to CHECKPOINT.eval_MODE.json with the mode's per-image file, and its
    one-line summary printed (by rank 0)."""
    from utils.assignments import class_matching, format_cluster_sizes, write_cluster_assignments, write_features
    from utils.checkpoint import write_text_atomic

    checkpoint = weights.path
    per_image = None  # (path, write) of the per-image file the mode writes beside its JSON
    summary = None    # the result line's text, when not the scores
    detail = ""       # what the result line adds after them
    if mode == "cluster":
        results = trainer.evaluate()
    elif mode == "assign":
        readout = None if trainer.method.has_head else weights.state["readout"]  # a head assigns per image
        results = trainer.assign(readout)
        if readout is not None:
            results["readout"] = fitted = readout_summary(readout)
            detail = (f"; the run's {fitted['num_clusters']} clusters of {fitted['features']} features "
                      f"({fitted['metric']})")
    elif mode == "features":
        kind, features = trainer.eval_set_features()
        results = {"features": kind, "shape": list(features.shape)}
        per_image = (checkpoint.with_suffix(".features.npz"),
                     lambda path: write_features(path, features, eval_data, kind))
        summary = f"{kind} features of {features.shape[0]} images, {features.shape[1]}-d"
    elif mode == "knn":
        results = {"knn_acc": trainer.knn_evaluate(), "knn_k": cfg.eval.knn_k,
                   "knn_temperature": cfg.eval.knn_temperature}
    else:
        results = trainer.linear_evaluate()
    if mode in CLUSTER_CSV_SUFFIX:
        results["cluster_sizes"] = sizes = trainer.last_cluster_sizes
        clusters = trainer.last_clusters
        matching = class_matching(clusters, eval_data, trainer.last_num_clusters)
        if matching is not None:
            results["class_matching"] = matching
        detail = f"; {format_cluster_sizes(sizes)}{detail}"
        per_image = (checkpoint.with_suffix(CLUSTER_CSV_SUFFIX[mode]),
                     lambda path: write_cluster_assignments(path, clusters, eval_data))
    results = {"mode": mode, "checkpoint": str(checkpoint), "epoch": int(weights.state["epoch"]),
               "config": cfg.source, "world_size": trainer.dist.world_size, **results}
    out = checkpoint.with_suffix(f".eval_{mode}.json")
    if trainer.dist.is_main:  # rank 0 only: the results file, the per-image file and the one-line summary
        write_text_atomic(out, json.dumps(results, indent=2) + "\n")
        written = str(out)
        if per_image is not None:
            per_image[1](per_image[0])
            written += f", {per_image[0]}"
        scores = "  ".join(f"{k} {results[k]:.4f}" for k in ("nmi", "acc", "ari", "knn_acc", "linear_acc")
                           if k in results) or "no labels to score"
        print(f"eval {mode} of {checkpoint} (epoch {results['epoch']}): {summary or scores}{detail} -> {written}",
              flush=True)
    return results


def remove_created_run_dir(run_dir: Path, created: Path) -> None:
    """Remove `run_dir` and, up to `created` (the topmost folder this run made), the parents it left
    empty. A parent another run has written into meanwhile (a shared run.output_dir) is kept."""
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in run_dir.parents:
        if not folder.is_relative_to(created):
            break
        try:
            folder.rmdir()  # only when empty
        except OSError:
            break


def set_up_run(cfg, dist_info, run_dir: Path, datasets: Datasets, resume_point: Checkpoint | None, *,
               resume: str):
    """Create the run directory, logging and metrics, build the Trainer and load the weights it starts
    from (the resumed checkpoint, or the method's pretrained run); returns (trainer, writer).

    A config the model or checkpoint cannot serve (a batch larger than the data, a mismatched or
    missing checkpoint, logging.wandb without wandb) is a one-line error. The resolved config is
    written only after that, and a run directory this call created is removed again, so bad input
    leaves nothing behind."""
    from utils import distributed as du
    from utils.config import config_changes, save_resolved_config
    from utils.logger import MetricWriter, setup_logging

    created = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    unwritable = None
    if dist_info.is_main:  # rank 0 only: create the run directory
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(run_dir, os.W_OK | os.X_OK):  # what refuse_unwritable_folder saw may have changed
                raise PermissionError(errno.EACCES, "not writable")
        except OSError as exc:  # made unwritable, or a full disk, while the data loaded
            unwritable = f"error: run.output_dir: cannot write the run directory {run_dir} ({exc.strerror or exc})"
            if created is not None:
                remove_created_run_dir(run_dir, created)
    unwritable = du.broadcast_object(unwritable)  # every rank stops together, or goes on once it exists
    if unwritable is not None:
        raise SystemExit(unwritable)
    setup_logging(dist_info.rank, run_dir / "train.log" if dist_info.is_main else None)
    seed_everything(cfg.run.seed, dist_info.rank)
    log.info("config %s -> run directory %s (%d process(es), device %s, %d threads each)", cfg.source, run_dir,
             dist_info.world_size, dist_info.device, torch.get_num_threads())
    writer = None
    try:
        if dist_info.is_main:  # rank 0 only: metrics file and wandb
            writer = MetricWriter(run_dir, use_wandb=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                                  wandb_entity=cfg.logging.wandb_entity, run_name=run_dir.name,
                                  config=cfg.to_dict())
        trainer = build_trainer(cfg, dist_info, run_dir, writer, datasets)
        if resume_point is not None:
            trainer.load(resume_point.state, resume_point.path)
            changes = config_changes(resume_point.state["config"], cfg.to_dict())  # load_checkpoint checked the key
            if changes and dist_info.is_main:  # rank 0 only: what the overrides changed (config.yml gets the new)
                log.warning("resuming with another config than %s was saved with (%d key(s)): %s", resume_point.path,
                            len(changes), "; ".join(changes))
        else:
            if resume:
                log.info("--resume auto: no checkpoint in %s yet, starting fresh", run_dir)
            trainer.load_pretrained()
    except (ValueError, ModuleNotFoundError, SystemExit) as exc:
        if writer is not None:
            writer.close()
        setup_logging(dist_info.rank, None)  # let go of train.log
        if dist_info.is_main and created is not None:  # rank 0 only: remove what this call created
            remove_created_run_dir(run_dir, created)
        raise SystemExit(exc.code if isinstance(exc, SystemExit) else f"error: {exc}") from None
    if dist_info.is_main:  # rank 0 only: the resolved config, once the run's weights have loaded
        save_resolved_config(cfg, run_dir / "config.yml")
    return trainer, writer


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    from utils.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.print_config:
        from utils.config import format_config

        print(format_config(cfg), end="")
        return {}
    if args.eval or args.checkpoint:
        modes, checkpoint = check_eval_args(args)
        return run_evaluation(cfg, modes, checkpoint)
    from utils.stop import StopOnSignal

    # SIGUSR1 (a cluster's time limit is near) from here on: every rank ends the same step,
    # last.pt keeps the position inside the epoch, and the exit status says "stopped, resume me".
    with StopOnSignal() as stop:
        return train(cfg, args, stop)


def describe_training(result) -> str:
    """The final line's account of the training (`result`: the trainer's FitResult): the run's epochs and
    this process's seconds, which after a resume count from the position it resumed at."""
    head = f"{result.epochs_total} epochs, {result.seconds:.0f}s"
    if result.resumed_at is None:
        return head
    epoch, step = result.resumed_at
    return f"{head} since the resume at epoch {epoch}" + (f", step {step}" if step else "")


def train(cfg, args: argparse.Namespace, stop) -> dict[str, float]:
    """Set up the run (or resume it) and train; the final NMI / ACC / ARI. A run stopped by `stop`
    (utils/stop.StopOnSignal) before its end exits with EXIT_STOPPED once last.pt is written."""
    from data.datasets import UnreadableImageError
    from utils import distributed as du
    from utils.assignments import class_matching, format_cluster_sizes, write_cluster_assignments
    from utils.checkpoint import write_text_atomic
    from utils.logger import setup_logging
    from utils.stop import EXIT_STOPPED

    dist_info = start_distributed(cfg)
    setup_logging(dist_info.rank, None)  # the console, until set_up_run adds train.log: the data's lines
    run_dir = prepare_run_dir(cfg, args.resume)
    refuse_unwritable_folder(run_dir, dist_info, f"run.output_dir: cannot write the run directory {run_dir}")
    datasets = build_datasets(cfg)  # before the run directory exists: bad data leaves nothing behind
    resume_point = find_resume_point(run_dir, args.resume)  # read, not yet applied: a bad file writes nothing
    trainer, writer = set_up_run(cfg, dist_info, run_dir, datasets, resume_point, resume=args.resume)
    try:
        result = trainer.fit(should_stop=stop)
    except (UnreadableImageError, FloatingPointError) as exc:  # mid-run: a file met in a pass, a diverging loss
        message = (f"{exc.one_line}, then continue the run with --resume auto" if isinstance(exc, UnreadableImageError)
                   else str(exc))
        log.error("%s", message)  # train.log says why the run ended; its checkpoints are as they were
        if writer is not None:
            writer.close()
        setup_logging(dist_info.rank, None)  # let go of train.log
        raise SystemExit(f"error: {message}") from None
    if writer is not None:
        writer.close()
    if result.stopped_on_request:
        if dist_info.is_main:  # rank 0 only: the line a job script's log shows
            print(f"stopped by {stop.received or 'a signal to another rank'} at epoch {trainer.epoch}, step "
                  f"{trainer.epoch_step} of {trainer.steps_per_epoch}: saved {run_dir / 'last.pt'}; continue with "
                  "--resume auto", file=sys.stderr, flush=True)
        du.cleanup_distributed()
        raise SystemExit(EXIT_STOPPED)
    metrics = result.metrics
    written: list[Path] = []  # the per-image and per-class files of the final read-out
    # rank 0 only, when this process evaluated the final model (not a finished run resumed)
    if trainer.last_clusters is not None and dist_info.is_main:
        written.append(run_dir / "clusters.csv")
        write_cluster_assignments(written[-1], trainer.last_clusters, datasets.eval)
        # The confusion of the final clusters with the classes (None on unlabeled images): which classes
        # the run merged, without a second pass through --eval.
        matching = class_matching(trainer.last_clusters, datasets.eval, trainer.last_num_clusters)
        if matching is not None:
            written.append(run_dir / "class_matching.json")
            write_text_atomic(written[-1], json.dumps(matching, indent=2) + "\n")
    if dist_info.is_main and (metrics or written):  # rank 0 only: the one-line summary a researcher greps for
        if metrics:
            scores = f"NMI {metrics['nmi']:.4f}  ACC {metrics['acc']:.4f}  ARI {metrics['ari']:.4f}"
        else:  # unlabeled images: how they spread over the clusters is all there is to say
            scores = "no labels to score" + (f" ({format_cluster_sizes(trainer.last_cluster_sizes)})"
                                             if trainer.last_cluster_sizes else "")
        print(f"final ({describe_training(result)}): {scores}"
              + (f"; clusters -> {', '.join(map(str, written))}" if written else ""), flush=True)
    du.cleanup_distributed()
    return metrics


def command_line_status(argv: list[str] | None = None) -> int:
    """`main(argv)` run from the command line: the process's exit status, with what Python prints for an
    uncaught exception printed here (a one-line error's message, or a traceback), since a distributed
    process ends by os._exit (`du.exit_process`), which prints nothing more."""
    import traceback

    try:
        return 0 if main(argv) is not None else 1
    except SystemExit as exc:  # the one-line errors; EXIT_STOPPED
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    from utils.distributed import exit_process

    # The process group is destroyed without a barrier: on an error the other ranks may never come here (the
    # errors all ranks raise have passed one). A distributed process then ends by os._exit, not through the
    # interpreter's finalization, during which a gloo thread could abort it (see exit_process).
    exit_process(command_line_status())
