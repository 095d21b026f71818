"""Per-task early stopping: each task's best validation score, its adapters at that score, and patience."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Keep, per task, the best validation score and a snapshot of the adapters that reached it.

    Args:
        tasks: the task names.
        patience: evaluations without improvement before a task stops (None: never).
        settled: per task, the first step whose adapters count (``Method.settles_at``: an AdaLoRA adapter
            before its final rank allocation is over its budget); earlier evaluations are not kept and do
            not use up patience.

    Attributes:
        best: ``{task: {"score", "step", "bad_evals", "stopped"[, "metrics"]}}`` (JSON-able; what a run
            returns and its checkpoint keeps).
        tensors: ``{task: {key: tensor}}``, the snapshot taken at each task's best score.
    """

    def __init__(
        self, tasks: Sequence[str], patience: int | None, settled: Mapping[str, int] | None = None
    ) -> None:
        self.patience = patience
        self.settled = dict(settled or {})
        self.best: dict[str, dict[str, Any]] = {
            t: {"score": -math.inf, "step": 0, "bad_evals": 0, "stopped": False} for t in tasks
        }
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}

    def stopped(self, task: str) -> bool:
        """Whether ``task`` ran out of patience (it trains no more)."""
        return self.best[task]["stopped"]

    def active(self) -> list[str]:
        """The tasks still training, in order."""
        return [t for t in self.best if not self.stopped(t)]

    def record(
        self,
        task: str,
        metrics: Mapping[str, Any],
        step: int,
        snapshot: Callable[[], dict[str, torch.Tensor]],
    ) -> bool:
        """Take one evaluation of ``task`` into account.

        Args:
            metrics: the evaluation's metrics; ``metrics["score"]`` is maximised.
            step: the step evaluated.
            snapshot: returns the task's adapters as they are now (called on a new best score only).

        Returns:
            True when ``task`` has just run out of patience (the caller stops training it).
        """
        best = self.best[task]
        if step < self.settled.get(task, 0):
            return False
        if metrics["score"] > best["score"]:
            best.update(score=metrics["score"], step=step, bad_evals=0, metrics=dict(metrics))
            self.tensors[task] = snapshot()
            return False
        best["bad_evals"] += 1
        if self.patience is not None and best["bad_evals"] >= self.patience:
            best["stopped"] = True
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """``{"best": JSON-able records, "tensors": {task: {key: tensor}}}``."""
        return {"best": self.best, "tensors": self.tensors}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.best = state["best"]
        self.tensors = {t: dict(snap) for t, snap in state["tensors"].items()}
