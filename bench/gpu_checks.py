"""The checks that only a GPU can make, as one prepared run for a lent machine (the `device` tool).

A session that is lent a GPU has minutes of device time, start-up included; this script spends them in
one call and leaves a short summary. Each check runs in its own subprocess under a time limit, so one
that fails or hangs costs only its own minutes; the summary lists every check's exit status, seconds
and the lines that carry its figures:

- env: torch, CUDA and the GPU's name;
- gpu_tests: the test suite's GPU-only tests (`skipif(not cuda)`);
- kmeans_imagenet: issue 3's GPU figure, `bench/kmeans.py --case imagenet --libs ours` (1,281,167 x
  256, K=1000, k-means++, n_init=3, max_iter=100);
- kmeans_agreement: torch_clustering's Lloyd iterations on the device against the CPU from the same
  initial centroids (labels, centroids, inertia), and half precision against float32 on the device;
- run_<method>: a short run of NNM, SCAN (self-labelling too), DCCM and ProPos through `main.py` on the
  device: their steps, whole-set passes, k-means and read-outs on CUDA tensors;
- deterministic: the ProPos run again with `run.deterministic=true`; the summary lists the warnings of
  the ops torch has no deterministic kernel for;
- propos_cifar10: ProPos with a ResNet-18 for 2 epochs on the 10,000 CIFAR-10 test images (bf16
  autocast), the pipeline at a real size;
- train_step: ProPos with a ResNet-18 on CIFAR-10 images (images/s of `bench/train_step.py`) with
  `train.amp` none and bf16, and `run.cudnn_benchmark` off and on;
- every_config: a real-size config of each method (ResNet-18/34 at 32-224 px, PCL's 1,000 clusters,
  SCAN's and NNM's stages after SimCLR) one epoch per stage on small data (`bench/every_config.py`).
NCCL needs two GPUs (it refuses two ranks on one), so the all-gathers across ranks stay unchecked on
NCCL with one lent GPU; the test suite checks them with gloo on the CPU. Checks run in the order above
until `--budget-s` is spent (the device tool stops a command after 10 minutes); those left are listed
as skipped.

    python bench/gpu_checks.py --out $OUT --data .devdata                # on the lent machine
    python bench/gpu_checks.py --out /tmp/checks --device cpu --quick    # the same commands, small, on a CPU

Before the device call, here: `mkdir -p .devdata && cp ../shared/data/{mnist,cifar10_test}.npz .devdata/`
(.gitignore keeps /.devdata/ out of git); then the device tool's run with `carry: [".devdata"]`, the
command `python3 bench/gpu_checks.py --out $OUT --data .devdata` and `timeout_s: 600`.

`--data` is a folder holding `mnist.npz` and `cifar10_test.npz` (copies of ../shared/data's, carried to
the machine: 40 MB). `--quick` shrinks every check (a smoke run of the commands, whose figures are not
the checks' own); `--only a,b` runs some of them. `--out` gets two files, `summary.txt` and `logs.txt`
(every check's command and whole output; the device tool brings back 8 files at most), and the runs'
directories go to a temporary folder; this script exits 0 when every check did.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from data.datasets import shared_data_dir  # noqa: E402

# The lines of a check's output that hold its figures (the rest stays in its log).
FIGURE_LINE = re.compile(r"final \(|feed|images/s|\bours\b|agreement|^torch |cuda|warn|passed|failed|error|skipped"
                         r"|configs ran|^FAIL ", re.IGNORECASE)
# One real-size config of each method for the every_config check (SimCLR's ImageNet-10 run serves NNM's).
EVERY_METHOD_CONFIGS = ("imagenet10_r18_simclr", "imagenet10_r18_nnm", "stl10_r18_simclr", "stl10_r18_scan",
                        "imagenet10_r34_cc", "imagenetdogs_r34_pcl", "stl10_r18_moco", "stl10_r18_byol",
                        "stl10_r18_simsiam", "tinyimagenet_r18_propos", "stl10_dccm", "imagenet10_mlp_idec")


class Check(NamedTuple):
    name: str
    command: list[str]
    timeout_s: int


def agreement_code(device: str, n: int, d: int, k: int) -> str:
    """A Python program comparing torch_clustering on `device` with the CPU from the same start."""
    return f"""
import torch
from torch_clustering import KMeans
g = torch.Generator().manual_seed(0)
centres = torch.randn({k}, {d}, generator=g) * 3
x = centres[torch.randint(0, {k}, ({n},), generator=g)] + torch.randn({n}, {d}, generator=g)
init = x[torch.randperm({n}, generator=g)[:{k}]].clone()
runs = {{}}
for where, data in (("cpu", x), ("{device}", x.to("{device}")), ("{device} half", x.to("{device}").half())):
    fit = KMeans({k}, init=init.to(data), n_init=1, max_iter=20, tol=0.0).fit(data)
    runs[where] = fit
cpu, dev, half = runs["cpu"], runs["{device}"], runs["{device} half"]
same = (cpu.labels == dev.labels.cpu()).float().mean().item()
gap = (cpu.centroids - dev.centroids.cpu().float()).abs().max().item()
print(f"agreement {device} vs cpu: labels {{same:.6f}}, max centroid gap {{gap:.2e}}, "
      f"inertia {{cpu.inertia:.6g}} vs {{dev.inertia:.6g}} ({{100 * (dev.inertia / cpu.inertia - 1):+.4f}}%)")
half_same = (half.labels.cpu() == dev.labels.cpu()).float().mean().item()
print(f"agreement {device} half vs float32: labels {{half_same:.6f}}, "
      f"inertia {{half.inertia:.6g}} ({{100 * (half.inertia / dev.inertia - 1):+.4f}}%), "
      f"centroids {{half.centroids.dtype}}")
ok = same > 0.999 and gap < 1e-3 and half_same > 0.99
raise SystemExit(0 if ok else 1)
"""


def build_checks(*, device: str, data: Path, quick: bool, runs: Path) -> list[Check]:
    """The checks, in the order they run; `runs` is the folder for the runs' directories."""
    python = sys.executable
    mnist, cifar = data / "mnist.npz", data / "cifar10_test.npz"
    small = quick or device == "cpu"
    # a short run of each method: real digits, a few epochs, evaluation at the end
    run_common = ["data.name=mnist", f"data.root={mnist}", f"data.limit={512 if small else 4096}",
                  f"run.device={device}", f"run.output_dir={runs}", "logging.progress_bar=false",
                  "cluster.n_init=1", "eval.n_init=1", "train.time_budget_minutes=0"]
    method_runs = {
        "nnm": ("mnist_cnn_nnm.yml", ["method.pretext_epochs=1", "method.scan_epochs=2", "method.num_heads=2",
                                      "train.batch_size_per_rank=64"]),
        "scan": ("mnist_cnn_scan.yml", ["method.pretext_epochs=1", "method.scan_epochs=1",
                                        "method.selflabel_epochs=1", "method.num_heads=2",
                                        "train.batch_size_per_rank=64"]),
        "dccm": ("mnist_dccm.yml", ["train.epochs=1", "train.batch_size_per_rank=32"]),
        "propos": ("mnist_cnn_propos.yml", ["train.epochs=2", "method.warmup_epochs=1",
                                            "train.batch_size_per_rank=64"]),
    }
    checks = [
        Check("env", [python, "-c", "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
                      "torch.cuda.is_available() and torch.cuda.get_device_name(0))"], 60),
        Check("kmeans_imagenet", [python, str(REPO_ROOT / "bench" / "kmeans.py"), "--case", "imagenet",
                                  "--device", device, "--libs", "ours",
                                  *(["--points", "20000", "--n-init", "1"] if small else [])], 240),
        Check("kmeans_agreement", [python, "-c", agreement_code(device, *((4000, 32, 20) if small
                                                                          else (200_000, 128, 100)))], 120),
        Check("gpu_tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(REPO_ROOT / "tests" / "test_augment.py"), "-k", "gpu"], 120),
    ]
    for method, (config, options) in method_runs.items():
        checks.append(Check(f"run_{method}", [python, str(REPO_ROOT / "main.py"), str(REPO_ROOT / "config" / config),
                                              *run_common, *options, f"run.name={method}"], 240))
    checks.append(Check("deterministic", [python, "-W", "always", str(REPO_ROOT / "main.py"),
                                          str(REPO_ROOT / "config" / "mnist_cnn_propos.yml"), *run_common,
                                          *method_runs["propos"][1], "run.deterministic=true",
                                          "run.name=deterministic"], 240))
    # the real-size pipeline: ResNet-18 ProPos on the 10,000 CIFAR-10 test images, 2 epochs with the
    # clustering terms on in the second (E-step k-means, whole-set passes and read-out at that size)
    checks.append(Check("propos_cifar10", [
        python, str(REPO_ROOT / "main.py"), str(REPO_ROOT / "config" / "cifar10_r18_propos.yml"),
        f"data.root={cifar}", "data.split=test", f"data.limit={256 if small else 0}", f"run.device={device}",
        f"run.output_dir={runs}", "run.name=propos_cifar10", "logging.progress_bar=false", "train.epochs=2",
        "method.warmup_epochs=1", "optim.warmup_epochs=1", "eval.every_epochs=1", "train.amp=bf16",
        f"train.batch_size_per_rank={32 if small else 256}"], 240))
    step_args = [python, str(REPO_ROOT / "bench" / "train_step.py"), "--device", device,
                 "--steps", "2" if small else "20", "--warmup", "1" if small else "3",
                 "--workers", "2" if small else "8"]
    step_config = (["--config", str(REPO_ROOT / "config" / "mnist_cnn_propos.yml"), "data.name=mnist",
                    f"data.root={mnist}", "data.limit=512", "train.batch_size_per_rank=64"] if small else
                   ["--config", str(REPO_ROOT / "config" / "cifar10_r18_propos.yml"), f"data.root={cifar}",
                    "data.split=test"])
    for amp, cudnn in (("none", "false"), ("bf16", "false"), ("bf16", "true")):
        checks.append(Check(f"train_step_amp-{amp}_cudnn-benchmark-{cudnn}",
                            [*step_args, *step_config, f"train.amp={amp}", f"run.cudnn_benchmark={cudnn}"], 240))
    # real-size configs of every method, one epoch per stage on small data (bench/every_config.py)
    checks.append(Check("every_config", [python, str(REPO_ROOT / "bench" / "every_config.py"), "--device", device,
                                         "--data", str(data), "--only", "mnist_cnn_propos" if small else
                                         ",".join(EVERY_METHOD_CONFIGS)], 240))
    return checks


def run_check(check: Check, log_path: Path) -> tuple[int, float, list[str]]:
    """(exit status, seconds, figure lines) of `check`, its command and whole output added to `log_path`."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)}
    try:
        proc = subprocess.run(check.command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                              timeout=check.timeout_s)
        status, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:
        status = 124
        output = (exc.stdout.decode("utf-8", "replace") if isinstance(exc.stdout, bytes) else exc.stdout or "")
        output += f"\n(stopped after its {check.timeout_s} s limit)\n"
    seconds = time.perf_counter() - start
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"===== {check.name}: exit {status}, {seconds:.0f} s\n{' '.join(check.command)}\n\n{output}\n")
    figures = [line.strip() for line in output.splitlines() if FIGURE_LINE.search(line)]
    if status != 0:   # the end of a failed check's output says why
        figures += [f"| {line}" for line in output.splitlines()[-5:]]
    return status, seconds, list(dict.fromkeys(figures))[-40:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for summary.txt and the checks' logs")
    p.add_argument("--device", default="cuda")
    p.add_argument("--data", default=str(shared_data_dir()), help="folder holding mnist.npz and cifar10_test.npz")
    p.add_argument("--quick", action="store_true", help="every check small: a smoke run of the commands")
    p.add_argument("--only", default="", help="comma-separated check names (prefixes) to run")
    p.add_argument("--budget-s", type=float, default=540,
                   help="seconds for all the checks (the device tool's limit is 600 per command)")
    args = p.parse_args(argv)
    data = Path(args.data).resolve()
    missing = [name for name in ("mnist.npz", "cifar10_test.npz") if not (data / name).is_file()]
    if missing:
        p.error(f"--data {data}: expected {' and '.join(missing)} there")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="gpu_checks_runs_"))
    checks = build_checks(device=args.device, data=data, quick=args.quick, runs=runs)
    wanted = [w for w in args.only.split(",") if w]
    if wanted:
        unknown = [w for w in wanted if not any(c.name.startswith(w) for c in checks)]
        if unknown:
            p.error(f"--only: no check named {unknown}; expected some of {', '.join(c.name for c in checks)}")
        checks = [c for c in checks if any(c.name.startswith(w) for w in wanted)]
    summary, log_path = out / "summary.txt", out / "logs.txt"
    log_path.write_text("", encoding="utf-8")
    lines = [f"bench/gpu_checks.py on {args.device}{' (quick)' if args.quick else ''}, {len(checks)} checks"]
    failed, skipped = [], []
    start = time.perf_counter()
    try:
        for check in checks:
            left = args.budget_s - (time.perf_counter() - start)
            if left < 15:   # too little left to start it: say so rather than run past the budget
                skipped.append(check.name)
                continue
            check = check._replace(timeout_s=int(min(check.timeout_s, left)))
            status, seconds, figures = run_check(check, log_path)
            if status != 0:
                failed.append(check.name)
            lines += [f"\n[{check.name}] exit {status}, {seconds:.0f} s", *(f"  {f}" for f in figures)]
            summary.write_text("\n".join(lines) + "\n", encoding="utf-8")   # after each check: a cut run keeps it
            print(f"{check.name}: exit {status}, {seconds:.0f} s", flush=True)
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    ran = len(checks) - len(skipped)
    lines.append(f"\n{ran - len(failed)} of {ran} checks passed" + (f"; failed: {', '.join(failed)}" if failed else "")
                 + (f"; skipped (budget of {args.budget_s:g} s spent): {', '.join(skipped)}" if skipped else ""))
    summary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(lines[-1])
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
