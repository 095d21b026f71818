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
from .weighting import WEIGHTINGS, needs_shared

__all__ = ["SCHEDULERS", "SHARING", "UNFREEZE", "TrainConfig"]

# learning-rate schedules (transformers.get_scheduler's names), each after an optional linear warm-up
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")

SHARING = ("none", "shared", "adversarial", "soft")
UNFREEZE = ("none", "all")  # or a regular expression on base parameter names


@dataclass
class TrainConfig:
    """Training settings (all YAML-friendly).

    Args:
        steps: optimiser steps (default 100 unless ``epochs`` is given).
        epochs: an alternative to ``steps``: passes over the tasks' training rows (a float; the trainer
            turns it into ``ceil(epochs · rows / (batch_size · processes · grad_accum))`` steps).
        batch_size: rows per forward (per process).
        lr: the adapters' learning rate; ``task_lr`` overrides it per task (``{task: lr}``).
        weight_decay: AdamW's decoupled decay, on matrices only (biases, norms and other 1-D parameters
            such as IA3 vectors or DoRA magnitudes never decay).
        scheduler / warmup_steps / warmup_ratio: the learning-rate schedule (one of :data:`SCHEDULERS`, via
            ``transformers.get_scheduler``) after a linear warm-up of ``warmup_steps`` (or that fraction of
            the run); ``scheduler_args`` are its own options (e.g. ``num_cycles``, ``power``).
        batching: ``per_task`` (each batch from one sampled task) or ``mixed`` (a task per row, routed).
        sampling / temperature: the :class:`TaskSampler` strategy.
        weighting / weighting_args: a loss weighting method (:data:`~.weighting.WEIGHTINGS`: static,
            uncertainty, dwa, gradnorm, pcgrad, or one of torchjd's aggregators upgrad, mgda, imtl_g,
            aligned_mtl, dualproj, cagrad, nash_mtl); all but the first three need ``sharing: shared``.
        grad_accum / max_grad_norm / mixed_precision: passed to Accelerate (``no`` | ``bf16`` | ``fp16``).
        eval_every / patience: validation schedule and per-task early stopping (None: never stop).
            DWA's "epochs" are ``eval_every`` steps.
        checkpoint_every: steps between checkpoints in ``output_dir/checkpoint``.
        sharing: ``none`` (one adapter per task), ``shared`` (every row runs the stack
            (``shared_adapter``, task): hierarchical sharing) or ``adversarial`` (``shared`` plus a task
            discriminator on the shared adapter's own representation, behind a gradient-reversal layer);
            with both, at the end each task's best (shared, task) stack is folded into one self-contained
            adapter. ``soft``: one adapter per task, all starting from the same initial values, plus
            ``soft_weight · (1/K) Σ_t ‖θ_t − θ̄‖²`` pulling each task's adapter parameters towards their
            mean over the tasks (Duong et al. 2015); ``soft_weight: 0`` is independent training.
        adversarial_weight / grl_lambda: weight of the discriminator loss and strength of the reversal.
        log_with: Accelerate trackers, e.g. ``["tensorboard"]`` (logs in ``output_dir``).
        activation_checkpointing: recompute the base's layers in backward instead of keeping their
            activations (``AdapterModel.activation_checkpointing_enable``: routing-aware, same gradients).
        unfreeze / base_lr: which base-model parameters train too — ``none`` (adapters and heads only),
            ``all`` (full fine-tuning, e.g. a baseline with head-only adapters) or a regular expression on
            parameter names (e.g. ``layer\\.5\\.``) — and their learning rate.
        fsdp: shard the frozen base over the processes with FSDP2 (one unit per transformer layer); the
            adapters and heads stay whole and DDP averages their gradients. Also on under an
            ``accelerate launch`` FSDP config (``configs/accelerate_fsdp.yaml``). Needs several processes.
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    lr: float = 5e-4
    task_lr: dict = field(default_factory=dict)
    weight_decay: float = 0.0
    scheduler: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    scheduler_args: dict = field(default_factory=dict)
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
    soft_weight: float = 1.0
    log_with: list = field(default_factory=list)
    unfreeze: str = "none"
    base_lr: float = 5e-5
    activation_checkpointing: bool = False
    fsdp: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.steps is not None and self.epochs is not None:
            problems.append(
                f"give steps or epochs, not both (got steps={self.steps!r}, epochs={self.epochs!r})"
            )
        elif self.epochs is not None and (not _is_number(self.epochs) or self.epochs <= 0):
            problems.append(
                f"epochs must be a positive number (passes over the training rows), got {self.epochs!r}"
            )
        elif self.steps is None and self.epochs is None:
            self.steps = 100
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler must be one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            problems.append(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        elif self.warmup_ratio and self.warmup_steps:
            problems.append("give warmup_steps or warmup_ratio, not both")
        if not isinstance(self.scheduler_args, dict):
            problems.append(
                f"scheduler_args must be a mapping of the schedule's options, got {self.scheduler_args!r}"
            )
        if not isinstance(self.task_lr, dict) or not all(
            isinstance(k, str) and _is_number(v) and v > 0 for k, v in self.task_lr.items()
        ):
            problems.append(f"task_lr must map task names to positive learning rates, got {self.task_lr!r}")
        if self.batching not in BATCHING:
            problems.append(f"batching must be 'per_task' or 'mixed', got {self.batching!r}")
        if self.sampling not in STRATEGIES:
            problems.append(f"sampling must be one of {STRATEGIES}, got {self.sampling!r}")
        if self.weighting not in WEIGHTINGS:
            problems.append(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.sharing not in SHARING:
            problems.append(f"sharing must be one of {list(SHARING)}, got {self.sharing!r}")
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
        if not isinstance(self.fsdp, bool):
            problems.append(f"fsdp must be true or false, got {self.fsdp!r}")
        elif self.fsdp and self.unfreeze != "none":
            problems.append(
                f"fsdp shards the frozen base and keeps trainable weights whole; unfreeze={self.unfreeze!r} "
                "would train base weights it cannot shard: use unfreeze: none with fsdp"
            )
        if self.weighting in WEIGHTINGS and needs_shared(self.weighting):
            if self.batching == "per_task":
                problems.append(
                    f"weighting {self.weighting!r} compares the tasks' gradients within one batch, and "
                    "batching: per_task gives each batch one task (nothing to compare): set batching: mixed"
                )
            if self.mixed_precision == "fp16":
                problems.append(
                    f"weighting {self.weighting!r} runs its own per-task backward passes, outside fp16's "
                    "loss scaling: use mixed_precision: bf16 (or no)"
                )
        if not isinstance(self.activation_checkpointing, bool):
            problems.append(
                f"activation_checkpointing must be true or false, got {self.activation_checkpointing!r}"
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        for key in ("steps", "batch_size", "grad_accum", "eval_every"):
            if key == "steps" and self.steps is None:
                continue  # from epochs, once the data is known
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
        for key in ("weight_decay", "adversarial_weight", "grl_lambda", "soft_weight"):
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

    @property
    def total_steps(self) -> int:
        """``steps`` once known (set from ``epochs`` by the trainer)."""
        if self.steps is None:
            raise RuntimeError("steps are not known yet: the trainer sets them from epochs and the data")
        return self.steps

    def warmup(self) -> int:
        """Warm-up steps (from ``warmup_ratio`` when that is given)."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * self.total_steps)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
