"""TrainConfig: every setting of a training run, checked once (all problems reported together)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..core.config import validate_name
from .batches import BATCHING
from .sampler import STRATEGIES
from .weighting import WEIGHTINGS

__all__ = ["SHARING", "UNFREEZE", "TrainConfig"]

SHARING = ("none", "shared", "adversarial")
UNFREEZE = ("none", "all")  # or a regular expression on base parameter names


@dataclass
class TrainConfig:
    """Training settings (all YAML-friendly).

    Args:
        steps: optimiser steps.
        batch_size: rows per forward (per process).
        batching: ``per_task`` (each batch from one sampled task) or ``mixed`` (a task per row, routed).
        sampling / temperature: the :class:`TaskSampler` strategy.
        weighting / weighting_args: a loss weighting method (static, uncertainty, dwa, gradnorm, pcgrad).
        grad_accum / max_grad_norm / mixed_precision: passed to Accelerate (``no`` | ``bf16`` | ``fp16``).
        eval_every / patience: validation schedule and per-task early stopping (None: never stop).
            DWA's "epochs" are ``eval_every`` steps.
        checkpoint_every: steps between checkpoints in ``output_dir/checkpoint``.
        sharing: ``none`` (one adapter per task), ``shared`` (every row runs the stack
            (``shared_adapter``, task): hierarchical sharing) or ``adversarial`` (``shared`` plus a task
            discriminator on the shared adapter's own representation, behind a gradient-reversal layer).
            At the end each task's best (shared, task) stack is folded into one self-contained adapter.
        adversarial_weight / grl_lambda: weight of the discriminator loss and strength of the reversal.
        log_with: Accelerate trackers, e.g. ``["tensorboard"]`` (logs in ``output_dir``).
        unfreeze / base_lr: which base-model parameters train too — ``none`` (adapters and heads only),
            ``all`` (full fine-tuning, e.g. a baseline with head-only adapters) or a regular expression on
            parameter names (e.g. ``layer\\.5\\.``) — and their learning rate.
    """

    steps: int = 100
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    batching: str = "per_task"
    sampling: str = "proportional"
    temperature: float = 2.0
    weighting: str = "static"
    weighting_args: dict = field(default_factory=dict)
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    eval_every: int = 50
    patience: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    output_dir: str = "runs/default"
    sharing: str = "none"
    shared_adapter: str = "shared"
    adversarial_weight: float = 0.1
    grl_lambda: float = 1.0
    log_with: list = field(default_factory=list)
    unfreeze: str = "none"
    base_lr: float = 5e-5

    def __post_init__(self) -> None:
        problems = []
        if self.batching not in BATCHING:
            problems.append(f"batching must be 'per_task' or 'mixed', got {self.batching!r}")
        if self.sampling not in STRATEGIES:
            problems.append(f"sampling must be one of {STRATEGIES}, got {self.sampling!r}")
        if self.weighting not in WEIGHTINGS:
            problems.append(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.sharing not in SHARING:
            problems.append(f"sharing must be 'none', 'shared' or 'adversarial', got {self.sharing!r}")
        if not isinstance(self.unfreeze, str):
            problems.append(f"unfreeze must be 'none', 'all' or a regular expression, got {self.unfreeze!r}")
        elif self.unfreeze not in UNFREEZE:
            try:
                re.compile(self.unfreeze)
            except re.error as e:
                problems.append(
                    f"unfreeze must be 'none', 'all' or a regular expression, got {self.unfreeze!r} ({e})"
                )
        if isinstance(self.log_with, str):
            self.log_with = [self.log_with]
        if not isinstance(self.log_with, list) or not all(isinstance(t, str) for t in self.log_with):
            problems.append(
                f"log_with must be a list of tracker names (e.g. [tensorboard]), got {self.log_with!r}"
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        for key in ("steps", "batch_size", "grad_accum", "eval_every"):
            if not _is_int(getattr(self, key)) or getattr(self, key) <= 0:
                problems.append(f"{key} must be a positive int, got {getattr(self, key)!r}")
        for key, what in (
            ("patience", "evaluations without improvement before a task stops"),
            ("checkpoint_every", "steps between checkpoints"),
        ):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value <= 0):
                problems.append(f"{key} must be a positive int ({what}) or null (never), got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            problems.append(f"seed must be an int >= 0, got {self.seed!r}")
        for key in ("lr", "base_lr", "temperature"):
            if not _is_number(getattr(self, key)) or getattr(self, key) <= 0:
                problems.append(f"{key} must be a positive number (e.g. 0.001), got {getattr(self, key)!r}")
        for key in ("weight_decay", "adversarial_weight", "grl_lambda"):
            if not _is_number(getattr(self, key)) or getattr(self, key) < 0:
                problems.append(f"{key} must be a number >= 0, got {getattr(self, key)!r}")
        if self.max_grad_norm is not None and (not _is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            problems.append(
                f"max_grad_norm must be a positive number or null (no clipping), got {self.max_grad_norm!r}"
            )
        if not isinstance(self.weighting_args, dict):
            problems.append(
                f"weighting_args must be a mapping of keyword arguments, got {self.weighting_args!r}"
            )
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            problems.append(f"output_dir must be a folder path, got {self.output_dir!r}")
        try:
            validate_name(self.shared_adapter, "shared_adapter name")
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
