"""Stopping a training run early on a signal, without losing it.

A cluster ends a job at its time limit. `StopOnSignal` turns SIGUSR1, which SLURM sends ahead of
that limit when asked, into a request: the trainer finishes the step in progress, every rank agrees
on the same step (`utils.distributed.any_rank`), and rank 0 writes `last.pt` with the position
inside the epoch. `--resume auto` then continues at the next batch of that epoch, with the same pseudo-labels,
learning rate, RNG state and batches as the uninterrupted run. The launcher exits with
`EXIT_STOPPED`, so a job script can tell "stopped, resumable" from "done" and "failed".

The scripts in scripts/ ask SLURM for SIGUSR1 a few minutes before the time limit and pass it on
(torchrun forwards it with `--signals-to-handle`); DataLoader workers ignore it (data.loaders).
SIGTERM and SIGINT keep their usual meaning, stop now: torchrun sends SIGTERM to the surviving
workers when one of them fails, and those may be waiting in a collective that never returns.
A request made during the feature pass of an E-step, or of an epoch's evaluations (but the run's
last), ends that pass at its next batch on every rank (`StopRequested`); the resumed run runs the
E-step or the evaluations again on the same weights. A request during k-means waits for its end.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry".
EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGUSR1,)


class StopRequested(Exception):
    """Raised on every rank at the same batch of a whole-dataset pass that was given the stop request
    (utils.features.extract_features); the trainer saves and ends the run."""


class StopOnSignal:
    """Context manager: while inside, the stop signals (SIGUSR1) set `received` (the signal's name)
    instead of killing the process; the previous handlers come back on exit. Outside the
    main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __call__(self) -> bool:
        """True once a stop signal has arrived (this process only)."""
        return self.received is not None

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
