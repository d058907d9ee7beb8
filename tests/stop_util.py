"""Helpers for the stop-and-resume tests: a deterministic SIGUSR1 at a chosen step, and the weights
oracle (the interrupted run's last.pt against the uninterrupted run's)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from utils.trainer import Trainer


def train_step_signalling_after(global_step: int, rank: int | None = None):
    """A `Trainer.train_step` that, right after step `global_step`, makes the process of `rank` (every
    rank when None) send itself SIGUSR1, SLURM's early warning of the time limit."""
    train_step = Trainer.train_step

    def train_step_then_signal(self, *args, **kwargs):
        terms = train_step(self, *args, **kwargs)
        if self.global_step == global_step and rank in (None, self.dist.rank):
            os.kill(os.getpid(), signal.SIGUSR1)
        return terms

    return train_step_then_signal


def feature_pass_signalling_at_batch(name: str, batch: int, rank: int | None = None):
    """A replacement for the Trainer method `name` (update_pseudo_labels: the E-step, or evaluate) whose
    feature pass, right after its batch `batch` (from 0), makes the process of `rank` (every rank when
    None) send itself SIGUSR1."""
    run = getattr(Trainer, name)

    def run_then_signal(self, *args, **kwargs):
        method, done = self.method, 0
        eval_features = method.eval_features

        def eval_features_then_signal(images, kind):
            nonlocal done
            features = eval_features(images, kind)
            if done == batch and rank in (None, self.dist.rank):
                os.kill(os.getpid(), signal.SIGUSR1)
            done += 1
            return features

        method.eval_features = eval_features_then_signal  # this instance only, for this call
        try:
            return run(self, *args, **kwargs)
        finally:
            del method.eval_features

    return run_then_signal


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """The model tensors of the two runs' last.pt agree to float32 rounding."""
    a, b = (torch.load(run / "last.pt", weights_only=True)["model"] for run in (run_a, run_b))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=1e-6, atol=1e-7), key


def logged_steps(run_dir: Path) -> list[int]:
    """Global steps of the step records in the run's metrics.jsonl so far, in order (read while the
    run may still be writing: a line not yet complete is left out)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"step/loss"' in line]
