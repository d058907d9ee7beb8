"""Logging set-up and the one metrics interface (console, JSON lines, wandb), used on rank 0."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def setup_logging(rank: int, log_file: Path | None = None) -> None:
    """Rank 0 logs INFO, the other ranks WARNING; each line names its rank when there are several."""
    level = logging.INFO if rank == 0 else logging.WARNING
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"[rank {rank}] " if world > 1 else ""
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if log_file is not None:
        # a file name that is not UTF-8 (surrogate escapes) in a message must not break the log
        file_handler = logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    root.setLevel(level)


def read_metric_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of the run's `metrics.jsonl` (MetricWriter's file), in order; [] when there is none.
    A last line still being written by a live run is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.endswith("}")]


class MetricWriter:
    """Writes metric records to `metrics.jsonl` in the run directory, and to wandb when enabled.

    Construct it on rank 0 only (the call site says so); other ranks pass None around.
    """

    def __init__(self, run_dir: Path, *, use_wandb: bool = False, wandb_project: str = "",
                 wandb_entity: str = "", run_name: str = "", config: dict[str, Any] | None = None):
        wandb = None
        if use_wandb:  # before any file is opened: a missing package leaves nothing to close
            try:
                import wandb
            except ImportError:
                raise ModuleNotFoundError("logging.wandb=true but the wandb package is not installed: "
                                          "pip install wandb") from None
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        self._wandb = None
        if wandb is not None:
            self._wandb = wandb.init(project=wandb_project, entity=wandb_entity or None, name=run_name,
                                     config=config, dir=str(run_dir), resume="allow")

    def write(self, record: dict[str, Any], *, step: int) -> None:
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v)
                 for k, v in record.items()}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
        self._file.write(json.dumps({"time": round(time.time(), 3), "step": step, **clean}) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
