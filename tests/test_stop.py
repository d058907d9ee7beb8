"""Stopping on SLURM's early warning (SIGUSR1) and requeueing: the signal handler, and both sbatch
scripts run end to end under test doubles of `srun` and `scontrol`, with real main.py ranks (gloo,
CPU): signalled, stopped, requeued, resumed, and every step trained exactly once."""
import os
import signal
import socket
import subprocess
import textwrap
import time
import warnings
from datetime import datetime
from pathlib import Path

import pytest
import torch

from tests.stop_util import logged_steps
from tests.test_train import DDP, DEMO
from tests.torchrun_util import REPO_ROOT
from utils.stop import EXIT_STOPPED, StopOnSignal

RUN = DDP  # the reduced demo for 2 ranks x 32 of 640 digits: 10 steps per epoch, 20 in all
TOTAL_STEPS = 20

# srun's part as the scripts use it: start SLURM_NTASKS copies of the command with their SLURM_PROCID,
# pass signals sent to srun on to every task, exit with the highest task status.
SRUN = textwrap.dedent("""\
    #!/bin/bash
    pids=()
    for ((i = 0; i < ${SLURM_NTASKS:-1}; i++)); do
      SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
      pids+=($!)
    done
    trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
    status=0
    for pid in "${pids[@]}"; do
      while true; do
        wait "$pid"; s=$?
        if [ "$s" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi  # the trap, not the task
        break
      done
      if [ "$s" -gt "$status" ]; then status=$s; fi
    done
    exit $status
    """)
# scontrol: log the call; answer `show hostnames` with this machine.
SCONTROL = textwrap.dedent("""\
    #!/bin/bash
    echo "$*" >> "$SCONTROL_LOG"
    if [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; fi
    """)


def test_stop_on_signal_records_sigusr1_instead_of_dying_and_restores_the_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with StopOnSignal() as stop:
        assert not stop() and stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop() and stop.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_job(script: str, env: dict[str, str], run_dir: Path, *, signal_after_first_step: bool):
    """Run the sbatch script as SLURM would start it; optionally send it SIGUSR1 (SLURM's B:USR1)
    once the first training step is logged. Returns (exit status, output)."""
    argv = ["bash", str(REPO_ROOT / "scripts" / script), str(DEMO), f"run.output_dir={run_dir.parent}",
            f"run.name={run_dir.name}", *RUN]
    started = time.monotonic()
    job = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if signal_after_first_step:
            deadline = time.monotonic() + 300
            while not logged_steps(run_dir) and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert job.poll() is None, "the job ended before its first step was logged"
            job.send_signal(signal.SIGUSR1)
        out, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    _warn_if_slow(script, time.monotonic() - started, out)
    return job.returncode, out


SLOW_JOB_S = 120  # a job takes 7-15 s here; one CI run saw it stall for about 8 minutes, cause not found


def _warn_if_slow(script: str, seconds: float, out: str) -> None:
    """A stalled job still passes, but leaves a warning in the test summary with the longest silence in
    torchrun's own log (LOGLEVEL=INFO: timestamped lines) and the lines either side of it, to find it."""
    if seconds < SLOW_JOB_S:
        return
    stamped = []
    for line in out.splitlines():
        try:  # torchrun's format: 'I1206 21:52:06.674000 5819 file.py:855] message'
            stamped.append((datetime.strptime(line[1:21], "%m%d %H:%M:%S.%f"), line))
        except ValueError:
            continue
    gaps = [(b[0] - a[0], a[1], b[1]) for a, b in zip(stamped, stamped[1:])]
    gap, before, after = max(gaps) if gaps else (None, "(no torchrun log lines)", "")
    warnings.warn(f"{script}: the job took {seconds:.0f} s; longest silence in torchrun's log: {gap} between\n"
                  f"{before}\n{after}", stacklevel=2)


@pytest.mark.parametrize("script, tasks", [("slurm_1node_4gpu.sbatch", 2), ("slurm_multinode.sbatch", 1)])
def test_sbatch_script_stops_requeues_and_the_next_start_finishes_the_run(tmp_path, script, tasks):
    doubles = tmp_path / "bin"
    doubles.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (doubles / name).write_text(text)
        (doubles / name).chmod(0o755)
    log = tmp_path / "scontrol.log"
    port = str(_free_port())
    env = {**os.environ, "PATH": f"{doubles}{os.pathsep}{os.environ['PATH']}", "SCONTROL_LOG": str(log),
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO_ROOT), "SLURM_NTASKS": str(tasks),
           "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "127.0.0.1",
           "SLURM_CPUS_PER_TASK": "2", "GPUS_PER_NODE": "2", "RDZV_PORT": port, "MASTER_PORT": port,
           "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "LOGLEVEL": "INFO"}  # LOGLEVEL: torchrun's own
    run_dir = tmp_path / "runs" / "job"

    status, out = _run_job(script, env, run_dir, signal_after_first_step=True)
    requeues = log.read_text().splitlines() if log.exists() else []
    assert status != 0 and "requeue 4242" in requeues, out[-4000:]
    if tasks == 2:  # srun's tasks are main.py itself: its own status comes through
        assert status == EXIT_STOPPED, out[-4000:]
    stopped = torch.load(run_dir / "last.pt", weights_only=True)
    assert 0 < stopped["global_step"] < TOTAL_STEPS and len(stopped["rng"]) == 2
    assert f"saved {run_dir / 'last.pt'}; continue with --resume auto" in out

    # The requeued job: the same script again, without a signal.
    status, out = _run_job(script, env, run_dir, signal_after_first_step=False)
    assert status == 0, out[-4000:]
    assert log.read_text().splitlines().count("requeue 4242") == 1  # finished: not requeued again
    assert f"resumed from {run_dir / 'last.pt'}" in (run_dir / "train.log").read_text()
    assert logged_steps(run_dir) == list(range(1, TOTAL_STEPS + 1))  # every step once: none redone, none skipped
    final = torch.load(run_dir / "last.pt", weights_only=True)
    assert (final["epoch"], final["global_step"]) == (2, TOTAL_STEPS)
