"""Mean and spread of the final scores over runs that differ only in their seed.

    python -m utils.summarize runs/cifar10_seed*            # one table row per group of runs
    python -m utils.summarize runs/* --json summary.json     # and the groups as JSON

Papers report means over several seeds (SCAN: 10 runs); this reads each run directory's resolved
`config.yml` and `metrics.jsonl`, takes the run's last evaluation (its final NMI / ACC / ARI, and
kNN accuracy when monitored), and groups runs whose configs are equal once the keys that name or
place a run (`run.name`, `run.seed`, `run.output_dir`, the device and threads, `data.root`,
`data.num_workers`, `data.decode_once`, `logging.*`) are left out. The spread is the sample standard
deviation (n - 1).
A run without scores is listed as skipped, with why: no evaluation yet (just started), or finished
on unlabeled images (it wrote `clusters.csv` and nothing to score).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from utils.config import flatten
from utils.logger import read_metric_records

log = logging.getLogger(__name__)

METRICS = ("nmi", "acc", "ari", "knn_acc")
# Keys that name, place or schedule a run without changing what it computes.
IGNORED_KEYS = ("run.name", "run.seed", "run.output_dir", "run.device", "run.threads_per_rank", "run.cudnn_benchmark",
                "run.deterministic", "data.root", "data.num_workers", "data.decode_once", "logging")


@dataclass
class RunScores:
    path: Path
    seed: int
    epochs: int                  # epochs trained at the last evaluation
    scores: dict[str, float]     # metric -> its value at the run's last evaluation


@dataclass
class Group:
    config: dict[str, Any]       # flattened, without IGNORED_KEYS
    runs: list[RunScores] = field(default_factory=list)

    @property
    def label(self) -> str:
        c = self.config
        return f"{c.get('method.name')} {c.get('data.name')} {c.get('model.backbone')}"

    def stats(self, metric: str) -> dict[str, float] | None:
        """mean, std (sample, n - 1; 0 for one run), min, max of `metric` over the runs that have it."""
        values = [r.scores[metric] for r in self.runs if metric in r.scores]
        if not values:
            return None
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in IGNORED_KEYS)


def read_run(run_dir: Path) -> tuple[dict[str, Any], RunScores | None]:
    """(the run's flattened config without IGNORED_KEYS, its last evaluation or None). A folder that
    is not a run directory is a ValueError naming it."""
    config_path = run_dir / "config.yml"
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: not a run directory (no config.yml)")
    try:
        config = flatten(yaml.safe_load(config_path.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError as exc:
        raise ValueError(f"{config_path}: not readable YAML ({str(exc).splitlines()[0]})") from None
    evaluations = [r for r in read_metric_records(run_dir) if any(f"eval/{m}" in r for m in METRICS)]
    last = evaluations[-1] if evaluations else None
    key = {k: v for k, v in config.items() if not _ignored(k)}
    if last is None:
        return key, None
    scores = {m: float(last[f"eval/{m}"]) for m in METRICS if f"eval/{m}" in last}
    return key, RunScores(path=run_dir, seed=int(config.get("run.seed", 0)), epochs=int(last["epoch"]) + 1,
                          scores=scores)


def summarize(run_dirs: list[Path]) -> tuple[list[Group], list[tuple[Path, str]]]:
    """(groups of runs with equal configs, in order of first appearance; (run, why) of the runs
    without scores)."""
    groups: list[Group] = []
    skipped: list[tuple[Path, str]] = []
    for run_dir in run_dirs:
        key, run = read_run(run_dir)
        if run is None:
            # A finished run writes clusters.csv after its last evaluation: without scores, its data
            # had no labels to score them with.
            finished = (run_dir / "clusters.csv").is_file()
            skipped.append((run_dir, "finished without scores: unlabeled data (its clusters are in clusters.csv)"
                            if finished else "no evaluation yet"))
            continue
        group = next((g for g in groups if g.config == key), None)
        if group is None:
            group = Group(config=key)
            groups.append(group)
        group.runs.append(run)
    return groups, skipped


def differences(group: Group, groups: list[Group]) -> dict[str, Any]:
    """The keys where `group` differs from the first group (what sets it apart), with its values."""
    first = groups[0].config
    keys = sorted(set(first) | set(group.config))
    return {k: group.config.get(k) for k in keys if group.config.get(k) != first.get(k)}


def format_table(groups: list[Group]) -> str:
    lines = []
    for i, group in enumerate(groups):
        seeds = sorted(r.seed for r in group.runs)
        epochs = sorted({r.epochs for r in group.runs})
        cells = []
        for metric in METRICS:
            s = group.stats(metric)
            if s is not None:
                cells.append(f"{metric.upper()} {s['mean']:.4f} ± {s['std']:.4f}")
        epoch_text = (f"{epochs[0]} epochs" if len(epochs) == 1
                      else f"{epochs[0]}-{epochs[-1]} epochs (unequal across runs: a time budget or an early stop)")
        lines.append(f"[{i}] {group.label}: {len(group.runs)} run(s), seeds {seeds}, {epoch_text}: "
                     + "  ".join(cells))
        if len(set(seeds)) < len(seeds):
            lines.append("    warning: a seed repeats, so these runs are not independent")
        if i:
            diff = differences(group, groups)
            lines.append("    differs from [0] in " + ", ".join(f"{k}={v}" for k, v in diff.items()))
    return "\n".join(lines)


def to_json(groups: list[Group]) -> list[dict[str, Any]]:
    return [{"label": g.label, "config": g.config,
             "runs": [{"path": str(r.path), "seed": r.seed, "epochs": r.epochs, **r.scores} for r in g.runs],
             **{m: s for m in METRICS if (s := g.stats(m)) is not None}} for g in groups]


def _log_to_console() -> None:
    """This module's records as bare lines: the table (INFO) on stdout, notes (WARNING) on stderr.
    Set up anew per call, on the streams of the moment."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    table = logging.StreamHandler(sys.stdout)
    table.addFilter(lambda record: record.levelno < logging.WARNING)
    notes = logging.StreamHandler(sys.stderr)
    notes.setLevel(logging.WARNING)
    for handler in (table, notes):
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> list[Group]:
    p = argparse.ArgumentParser(prog="python -m utils.summarize", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories (run.output_dir/run.name)")
    p.add_argument("--json", type=Path, help="also write the groups, their runs and statistics here")
    args = p.parse_args(argv)
    _log_to_console()
    try:
        groups, skipped = summarize(args.run_dirs)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    for run_dir, why in skipped:
        log.warning("skipped %s: %s", run_dir, why)
    if not groups:
        raise SystemExit("error: none of the runs has scores to summarize (see the lines above)")
    log.info("%s", format_table(groups))
    if args.json:
        from utils.checkpoint import write_text_atomic

        write_text_atomic(args.json, json.dumps(to_json(groups), indent=2) + "\n")
    return groups


if __name__ == "__main__":
    main()
