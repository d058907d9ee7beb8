"""One checkpoint contract for every method.

A checkpoint is a flat dict of plain Python types and tensors, so `torch.load(weights_only=True)`
reads it: model (the unwrapped module, no `module.` prefix), optimizer, scheduler, scaler, trainer
position (epoch, global_step, best metric), the RNG states of every rank, and the config as a dict.
Rank 0 writes it atomically (temporary file in the same folder, then os.replace), so a crash mid-write
never leaves a truncated `last.pt`.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch

from utils import distributed as du

log = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "global_step", "best", "rng", "config")


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain types (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (collective: call on all ranks)."""
    mine = capture_rng_state()
    if not du.is_dist():
        return [mine]
    out: list[Any] = [None] * du.get_world_size()
    torch.distributed.all_gather_object(out, mine)
    return out


def write_file_atomic(path: Path, write: Callable[[IO], Any], *, binary: bool = False) -> None:
    """Write a file through `write(f)` atomically: a hidden temporary file in the same folder, fsync,
    then os.replace, so a reader never sees half a file and a crash never leaves a truncated one. A
    failed write (a full disk) leaves the old file and no temporary one. Text is UTF-8; a file name
    whose bytes are not UTF-8 (a surrogate escape in Python) is written back as those bytes."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w", encoding=None if binary else "utf-8",
                  errors=None if binary else "surrogateescape") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file (resolved config, evaluation results) with `write_file_atomic`."""
    write_file_atomic(path, lambda f: f.write(text))


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write `state` with `write_file_atomic`, once it holds every key of the checkpoint contract."""
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint for {path} lacks keys {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: not a checkpoint of this framework (missing keys {missing})")
    return state


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`exc`'s message on one line, cut at `limit` characters (torch's load_state_dict errors list
    every missing and mismatched key over many lines)."""
    return " ".join(str(exc).split())[:limit]


def load_model_state(model: torch.nn.Module, state_dict: dict[str, Any], source: Path) -> None:
    """`model.load_state_dict(state_dict)`; a mismatch (another backbone, head size or method) is a
    ValueError of one line naming `source`, instead of torch's page of missing and unexpected keys."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ValueError(f"{source}: the checkpoint's model does not match the config ({one_line(exc)})") from None


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    """`--resume auto`: the newest checkpoint file in the run directory, if any."""
    candidates = [p for p in run_dir.glob("*.pt") if p.is_file()] if run_dir.is_dir() else []
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None
