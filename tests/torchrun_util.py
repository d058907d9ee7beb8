"""Run a script under a real `torchrun --nproc_per_node=N` (gloo on the CPU) from a test, or
load it as a module to reuse its data and constants in the one-process oracle."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from data.datasets import shared_data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = shared_data_dir()


def run_torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 600.0,
                 env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Launch `script` with torchrun on `nproc` local CPU processes; raise with its output if it fails
    (unless `check` is False: the caller looks at the exit status).

    Each worker gets one thread (two workers share this machine's two cores) and the repository
    root on PYTHONPATH, so scripts can import the project's packages.
    """
    full_env = dict(os.environ)
    full_env.update({
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), full_env.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
    })
    if env:
        full_env.update(env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(cmd[3:])} failed with exit code {proc.returncode}:\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def load_script(path: str | Path) -> ModuleType:
    """Import the script at `path` as a module (its `if __name__ == "__main__"` part does not run)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
