"""What a training run leaves on disk while it runs, and how it stops: the live ``metrics.csv``, a Ctrl-C
that ends the run at a step boundary (with a checkpoint) instead of mid-step, and the test crash point."""

from __future__ import annotations

import csv
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["MetricsLog", "StopRequest", "TrainingInterrupted"]


class TrainingInterrupted(Exception):
    """Training stopped on request (Ctrl-C / SIGINT) after a whole step, with a checkpoint written.

    Attributes:
        checkpoint: the checkpoint folder (``output_dir/checkpoint``).
        step: the last completed step (the checkpoint's).
    """

    def __init__(self, checkpoint: Path, step: int) -> None:
        super().__init__(f"training interrupted after step {step}; checkpoint in {checkpoint}")
        self.checkpoint, self.step = Path(checkpoint), step


class MetricsLog:
    """``metrics.csv`` written as training goes: one row per step, flushed as soon as the step (and its
    evaluation) is done, so a killed run keeps its curve. Columns are the union of the keys seen so far;
    a row with a new key (the first evaluation) rewrites the file once with the wider header."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.columns: list[str] = []

    def reset(self, rows: list[dict]) -> None:
        """Start the file again from ``rows`` (a fresh run: none; a resumed run: the checkpoint's history,
        which drops the rows a killed run logged after its last checkpoint)."""
        self.columns = []
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        self._rewrite(rows)

    def append(self, row: dict, rows: list[dict]) -> None:
        """Add ``row`` (the last of ``rows``, the whole history, used when the header must grow)."""
        if not self.columns or set(row) - set(self.columns):
            self._rewrite(rows)
            return
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns).writerow(row)
            fh.flush()

    def _rewrite(self, rows: list[dict]) -> None:
        self.columns = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)  # readers never see a half-written header


class StopRequest:
    """While active, the first SIGINT only asks training to stop after the current step (a checkpoint of a
    half-done step could not be resumed exactly); a second one interrupts at once. Only the main thread
    can own signal handlers: elsewhere this does nothing and Ctrl-C behaves as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None  # the handler to put back

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        print(
            "\nstopping after this step and writing a checkpoint (Ctrl-C again to quit now)", file=sys.stderr
        )


def crash_point(step: int) -> None:
    """Lets the crash tests kill a training process right after a given step (and its checkpoint, if one is
    due): ``ADAPTERS_MTL_CRASH_AT=step:N``."""
    if os.environ.get("ADAPTERS_MTL_CRASH_AT") == f"step:{step}":
        os._exit(17)
