"""The benchmarks that build their trainer through the launcher still run (one step, not timed)."""
import re
import subprocess
import sys

from tests.torchrun_util import REPO_ROOT


def test_train_step_bench_runs_both_feeds_through_the_launchers_builders():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "train_step.py"), "--steps", "1",
                           "--warmup", "0", "--workers", "1", "train.batch_size_per_rank=32"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rates = dict(re.findall(r"^(device|workers) +feed: +([0-9.]+) images/s", proc.stdout, re.M))
    assert set(rates) == {"device", "workers"} and all(float(v) > 0 for v in rates.values()), proc.stdout
    assert "batch 32," in proc.stdout                      # the override reached the launcher's config
    ratio = float(re.search(r"device feed / workers feed: ([0-9.]+)x", proc.stdout).group(1))
    device, workers = float(rates["device"]), float(rates["workers"])
    # The rates are printed to within 0.05 and the ratio to within 0.005, so the printed ratio must
    # lie in what the printed rates allow: on a loaded machine one step can run at a few images/s,
    # where that interval is far wider than any fixed tolerance.
    low = (device - 0.05) / (workers + 0.05) - 0.005
    high = (device + 0.05) / (workers - 0.05) + 0.005 if workers > 0.05 else float("inf")
    assert low <= ratio <= high, (ratio, device, workers)
