"""MultiTaskTrainer: one adapter (and head) per task, trained jointly on Accelerate.

Reads top to bottom: set-up (accelerator, optimiser, samplers), loop (sample a task or one task per
row, routed forward, per-task losses, weighting, step), evaluate, checkpoint, finish (best adapters).
Checkpoints hold only what trains (adapter/head tensors and optimiser moments, as safetensors) plus
JSON state: nothing is pickled, and a resumed run ends with the same adapters as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.config import validate_name
from ..core.heads import pool
from ..core.model import AdapterModel
from ..data.tasks import TaskData
from ..serving.merging import add_cat, lora_factors
from .adversarial import TaskDiscriminator
from .objectives import collate, evaluate_task, task_loss
from .run_state import MetricsLog, StopRequest, TrainingInterrupted, crash_point
from .sampler import STRATEGIES, TaskSampler
from .weighting import WEIGHTINGS, make_weighting

__all__ = ["MultiTaskTrainer", "TrainConfig", "TrainingInterrupted"]


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
        if self.batching not in ("per_task", "mixed"):
            problems.append(f"batching must be 'per_task' or 'mixed', got {self.batching!r}")
        if self.sampling not in STRATEGIES:
            problems.append(f"sampling must be one of {STRATEGIES}, got {self.sampling!r}")
        if self.weighting not in WEIGHTINGS:
            problems.append(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.sharing not in ("none", "shared", "adversarial"):
            problems.append(f"sharing must be 'none', 'shared' or 'adversarial', got {self.sharing!r}")
        if not isinstance(self.unfreeze, str):
            problems.append(f"unfreeze must be 'none', 'all' or a regular expression, got {self.unfreeze!r}")
        elif self.unfreeze not in ("none", "all"):
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
        for key, what in (("patience", "evaluations without improvement before a task stops"),
                          ("checkpoint_every", "steps between checkpoints")):  # fmt: skip
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Stream:
    """Endless, seeded, resumable stream of example indices (a new permutation each epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> int:
        if self.pos == self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        self.pos += 1
        return int(self._perm[self.pos - 1])

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()


class _Step(nn.Module):
    """What Accelerate prepares (and DDP wraps): the routed model plus the optional task discriminator, so
    the discriminator's gradients are synchronised like the adapters'."""

    def __init__(self, model: AdapterModel, discriminator: TaskDiscriminator | None) -> None:
        super().__init__()
        self.model, self.discriminator = model, discriminator

    def forward(self, adapters, discriminate_from: int | None = None, **inputs):
        out = self.model(**inputs, adapters=adapters)
        if discriminate_from is None:
            return out, None
        # the shared adapter's own representation of rows [discriminate_from:], mean-pooled over tokens
        mask = inputs["attention_mask"][discriminate_from:]
        pooled = pool(out.last_hidden_state[discriminate_from:], mask, "mean", None)
        return out, self.discriminator(pooled)


class MultiTaskTrainer:
    """Train the adapters of ``tasks`` on ``model``.

    Args:
        model: an :class:`AdapterModel` holding one adapter with a head per task (same names as the tasks),
            plus, with ``sharing`` other than ``none``, a LoRA adapter named ``config.shared_adapter``.
        tokenizer: the base model's tokenizer.
        tasks: ``{name: TaskData}``.
        config: :class:`TrainConfig`.
        shared: parameters shared by all tasks (for GradNorm/PCGrad); default: the shared adapter's.
    """

    def __init__(
        self, model: AdapterModel, tokenizer, tasks: dict[str, TaskData], config: TrainConfig, shared=()
    ) -> None:
        from accelerate import Accelerator, DistributedDataParallelKwargs

        missing = [t for t in tasks if t not in model.adapter_names]
        headless = [t for t, d in tasks.items() if not d.generative and t in model.adapter_names and t not in model.heads]  # fmt: skip
        if missing or headless:
            raise ValueError(
                f"tasks {missing + headless} have no adapter{' with a head' if headless else ''} in the model; "
                "add_adapter(name, config, head=data.head_config()) for each task first"
            )
        kinds = {d.generative for d in tasks.values()}
        if len(kinds) > 1:
            raise ValueError(
                "causal_lm tasks (trained through the base LM head) cannot be trained with head tasks in one "
                f"trainer: {[t for t, d in tasks.items() if d.generative]} vs {[t for t, d in tasks.items() if not d.generative]}; "
                "train them separately, or make every task causal_lm (classification as generation)"
            )
        self.cfg, self.tasks = config, tasks
        self.shared_name = None if config.sharing == "none" else config.shared_adapter
        if self.shared_name is not None:
            self._check_sharing(model)
        self.shared = list(shared) or (
            list(model.adapter_parameters(self.shared_name).values()) if self.shared_name else []
        )
        if config.weighting in ("gradnorm", "pcgrad") and not self.shared:
            raise ValueError(
                f"weighting {config.weighting!r} works on shared parameters and there are none: "
                "set sharing: shared (a shared adapter stacked under the task adapters) or pick static, "
                "uncertainty or dwa"
            )
        torch.manual_seed(config.seed)
        _allow_new_precision(config.mixed_precision)
        # adapters of tasks absent from a batch get no gradient: DDP must allow unused parameters
        self.acc = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            log_with=list(config.log_with) or None,
            project_dir=config.output_dir,
        )
        if config.log_with:
            self.acc.init_trackers("train", config={k: str(v) for k, v in asdict(config).items()})
        self.train_sets = {t: d.encode(tokenizer, "train") for t, d in tasks.items()}
        self.tokenizer = tokenizer
        self.sampler = TaskSampler({t: len(ds) for t, ds in self.train_sets.items()}, config.sampling,
                                   temperature=config.temperature, total_steps=config.steps, seed=config.seed)  # fmt: skip
        self.streams = {
            t: _Stream(len(ds), config.seed + i) for i, (t, ds) in enumerate(self.train_sets.items())
        }
        self.weighting = make_weighting(config.weighting, list(tasks), **config.weighting_args)
        discriminator = None
        if config.sharing == "adversarial":
            ref = next(model.base.parameters())
            discriminator = TaskDiscriminator(model.hidden_size, len(tasks), lambda_=config.grl_lambda)
            discriminator.to(device=ref.device)
        self.step_module = _Step(model, discriminator)
        self.inner = model
        self._unfreeze(model)
        self.named = self._named_trainables()
        groups = [{"params": [p for k, p in self.named.items() if not k.startswith("base::")]}]
        base_params = [p for k, p in self.named.items() if k.startswith("base::")]
        if base_params:
            groups.append({"params": base_params, "lr": config.base_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.model, self.optimizer = self.acc.prepare(self.step_module, self.optimizer)
        self.step = 0
        self.folded = False
        self.history: list[dict] = []
        self.best: dict[str, dict] = {
            t: {"score": -math.inf, "step": 0, "bad_evals": 0, "stopped": False} for t in tasks
        }
        self._best_tensors: dict[str, dict[str, torch.Tensor]] = {}

    def _check_sharing(self, model: AdapterModel) -> None:
        name = self.shared_name
        if name not in model.adapter_names:
            raise ValueError(
                f"sharing={self.cfg.sharing!r} needs a shared LoRA adapter named {name!r} in the model: "
                f"add_adapter({name!r}, LoraConfig(...)) without a head (or set shared_adapter)"
            )
        if name in self.tasks or name in model.heads:
            raise ValueError(f"the shared adapter {name!r} must not be a task and must not have a head")
        not_lora = [n for n in [name, *self.tasks] if not model.can_merge(n)]
        if not_lora:
            raise ValueError(
                f"sharing folds each (shared, task) stack into one LoRA adapter, so every adapter must be LoRA "
                f"only; {not_lora} are not. Use sharing: none for prefix adapters."
            )

    def _unfreeze(self, model: AdapterModel) -> None:
        if self.cfg.unfreeze == "none":
            return
        pattern = None if self.cfg.unfreeze == "all" else re.compile(self.cfg.unfreeze)
        self._base_named = {
            n: p for n, p in model.base_parameters().items() if pattern is None or pattern.search(n)
        }
        if not self._base_named:
            raise ValueError(f"unfreeze={self.cfg.unfreeze!r} matches no base-model parameter name")
        for p in self._base_named.values():
            p.requires_grad_(True)

    def _named_trainables(self) -> dict[str, nn.Parameter]:
        """Every parameter the optimiser updates, under a stable name (checkpoint keys)."""
        named = {f"{t}::{k}": p for t in self.tasks for k, p in self.inner.adapter_parameters(t).items()}
        named.update({f"base::{n}": p for n, p in getattr(self, "_base_named", {}).items()})
        if self.shared_name:
            named.update(
                {
                    f"{self.shared_name}::{k}": p
                    for k, p in self.inner.adapter_parameters(self.shared_name).items()
                }
            )
        if isinstance(self.weighting, nn.Module) and self.cfg.weighting == "uncertainty":
            named.update({f"weighting::{k}": p for k, p in self.weighting.named_parameters()})
        if self.step_module.discriminator is not None:
            named.update(
                {f"discriminator::{k}": p for k, p in self.step_module.discriminator.named_parameters()}
            )
        return named

    def _route(self, task: str):
        return (self.shared_name, task) if self.shared_name and not self.folded else task

    # ------------------------------------------------------------------ batches and losses
    def _batch(self) -> tuple[dict, list[str]]:
        # Every process draws the same global batch (same seeds) and keeps its own slice, so N processes
        # of batch_size rows see exactly the rows one process of N·batch_size rows would.
        B = self.cfg.batch_size * self.acc.num_processes
        active = [t for t in self.tasks if not self.best[t]["stopped"]] or list(self.tasks)
        if self.cfg.batching == "per_task":
            task = self.sampler.sample(self.step)
            while task not in active:
                task = self.sampler.sample(self.step)
            rows = [task] * B
        else:
            rows = [t if t in active else active[0] for t in self.sampler.sample_rows(B, self.step)]
        indices = [self.streams[t].next() for t in rows]
        lo = self.acc.process_index * self.cfg.batch_size
        rows, indices = rows[lo : lo + self.cfg.batch_size], indices[lo : lo + self.cfg.batch_size]
        batch, labels = collate(self.tokenizer, [self.train_sets[t][i] for t, i in zip(rows, indices, strict=True)])  # fmt: skip
        return {k: v.to(self.acc.device) for k, v in batch.items()}, labels, rows

    def _losses(self, batch: dict, labels: list, rows: list[str]) -> dict[str, torch.Tensor]:
        """Per-task losses, plus ``"adversary"`` (the discriminator's loss) with adversarial sharing."""
        adapters = [self._route(t) for t in rows]
        adversarial = self.step_module.discriminator is not None
        if adversarial:  # the same rows again through the shared adapter alone, in the same routed call
            batch = {k: torch.cat([v, v]) for k, v in batch.items()}
            adapters = adapters + [self.shared_name] * len(rows)
        out, disc_logits = self.model(adapters, len(rows) if adversarial else None, **batch)
        losses = {}
        for task in dict.fromkeys(rows):
            task_rows = [i for i, t in enumerate(rows) if t == task]
            losses[task] = task_loss(self.tasks[task], task, out, task_rows, labels)
        if adversarial:
            task_ids = torch.tensor([list(self.tasks).index(t) for t in rows], device=disc_logits.device)
            losses["adversary"] = torch.nn.functional.cross_entropy(disc_logits.float(), task_ids)
        return losses

    def _backward(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        adversary = losses.pop("adversary", None)
        extra = self.cfg.adversarial_weight * adversary if adversary is not None else 0.0
        if hasattr(self.weighting, "total"):  # one weighted sum: backward through Accelerate
            self.acc.backward(self.weighting.total(losses) + extra)
            weights = self.weighting.last
        else:  # gradient surgery / GradNorm work on per-task gradients themselves (they add to .grad)
            if adversary is not None:
                self.acc.backward(extra, retain_graph=True)
            weights = self.weighting.backward(losses, self.shared)
        if adversary is not None:
            losses["adversary"] = adversary
        return weights

    # ------------------------------------------------------------------ loop
    def train(self, resume_from: str | Path | None = None, stop_after: int | None = None) -> dict:
        """Run until ``config.steps`` (or ``stop_after`` steps in this call, for tests); returns the results.

        ``output_dir/metrics.csv`` grows a row per step as training goes. The first Ctrl-C (SIGINT) ends the
        run after the current step with a checkpoint in ``output_dir/checkpoint``.

        Raises:
            FileNotFoundError: ``resume_from`` has no checkpoint.
            TrainingInterrupted: stopped by SIGINT; the checkpoint to resume from is written.
        """
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        from tqdm.auto import tqdm

        log = MetricsLog(Path(self.cfg.output_dir) / "metrics.csv") if self.acc.is_main_process else None
        if log is not None:
            log.reset(self.history)
        bar = tqdm(
            total=self.cfg.steps, initial=self.step, disable=not self.acc.is_local_main_process, desc="train"
        )
        done_now = 0
        self.model.train()
        with StopRequest() as stop:
            while self.step < self.cfg.steps and (stop_after is None or done_now < stop_after):
                self._train_step(bar)
                done_now += 1
                if log is not None:
                    log.append(self.history[-1], self.history)
                checkpoint = Path(self.cfg.output_dir) / "checkpoint"
                if self._stop_requested(stop):
                    if self.acc.is_main_process:
                        self.save_checkpoint(checkpoint)
                    self.acc.wait_for_everyone()
                    bar.close()
                    raise TrainingInterrupted(checkpoint, self.step)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    if self.acc.is_main_process:  # one writer
                        self.save_checkpoint(checkpoint)
                    self.acc.wait_for_everyone()
                crash_point(self.step)
        bar.close()
        if self.step >= self.cfg.steps:
            self._restore_best()
            if self.cfg.log_with:
                self.acc.end_training()
        return {"step": self.step, "best": self.best, "history": self.history}

    def _train_step(self, bar) -> None:
        """One optimiser step (``grad_accum`` batches), its history row and, when due, the evaluation."""
        for _ in range(self.cfg.grad_accum):
            with self.acc.accumulate(self.model):
                batch, labels, rows = self._batch()
                losses = self._losses(batch, labels, rows)
                weights = self._backward(losses)
                if self.acc.sync_gradients and self.cfg.max_grad_norm:
                    self.acc.clip_grad_norm_(list(self.named.values()), self.cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        row = {
            "step": self.step,
            **{f"loss/{t}": v.item() for t, v in losses.items()},
            **{f"weight/{t}": w for t, w in weights.items()},
        }
        self.history.append(row)
        bar.update(1)
        bar.set_postfix({t: f"{v.item():.3f}" for t, v in losses.items()})
        if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
            self._evaluate_all()
            if hasattr(self.weighting, "end_epoch"):
                self.weighting.end_epoch()
            self.model.train()
        if self.cfg.log_with:
            self.acc.log({k: v for k, v in self.history[-1].items() if k != "step"}, step=self.step)

    def _stop_requested(self, stop: StopRequest) -> bool:
        if self.acc.num_processes == 1:
            return stop.requested
        # every rank must stop after the same step, or the next step's collectives would hang
        flag = torch.tensor([float(stop.requested)], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self, task: str, split: str = "validation", batch_size: int = 64, report: bool = False
    ) -> dict:
        """Metrics of ``task`` on ``split`` (see :mod:`.objectives`): accuracy and macro-F1 for
        classification (also as generation), MSE for regression, loss and perplexity for generation."""
        was_training = self.inner.training
        self.inner.eval()
        try:  # every process evaluates the whole split on the unwrapped model (no DDP collectives)
            return evaluate_task(self.inner, self.tasks[task], self.tokenizer, self._route(task), self.acc.device, split, batch_size, report)  # fmt: skip
        finally:
            self.inner.train(was_training)

    def _snapshot(self, task: str) -> dict[str, torch.Tensor]:
        """The task's adapter and head (and the shared adapter, under ``shared/``) as they are now."""
        snap = {k: p.detach().clone() for k, p in self.inner.adapter_parameters(task).items()}
        if self.shared_name:
            shared = self.inner.adapter_parameters(self.shared_name)
            snap.update({f"shared/{k}": p.detach().clone() for k, p in shared.items()})
        return snap

    def _evaluate_all(self) -> None:
        for task in self.tasks:
            if self.best[task]["stopped"]:
                continue
            metrics = self.evaluate(task)
            self.history[-1].update({f"val/{task}/{k}": v for k, v in metrics.items()})
            best = self.best[task]
            if metrics["score"] > best["score"]:
                best.update(score=metrics["score"], step=self.step, bad_evals=0, metrics=metrics)
                self._best_tensors[task] = self._snapshot(task)
            else:
                best["bad_evals"] += 1
                if self.cfg.patience is not None and best["bad_evals"] >= self.cfg.patience:
                    best["stopped"] = True
                    self.inner.set_trainable(task, False)

    @torch.no_grad()
    def _restore_best(self) -> None:
        """Put each task's best adapter back; with sharing, fold its best (shared, task) stack into one
        self-contained LoRA adapter under the task's name (what the registry publishes) and drop the shared
        adapter."""
        if self.folded:
            return
        for task in self.tasks:
            snap = self._best_tensors.get(task) or self._snapshot(task)
            if not self.shared_name:
                for k, p in self.inner.adapter_parameters(task).items():
                    p.copy_(snap[k])
                continue
            own = {k: v for k, v in snap.items() if not k.startswith("shared/")}
            shared = {k[len("shared/") :]: v for k, v in snap.items() if k.startswith("shared/")}
            parts = [
                (lora_factors(self.inner, self.shared_name, shared), 1.0),
                (lora_factors(self.inner, task, own), 1.0),
            ]
            head = self.inner.head_config(task)
            head_state = {k.split(".", 2)[2]: v for k, v in own.items() if k.startswith(f"heads.{task}.")}
            dropout = max(c.dropout for n in (self.shared_name, task) for c in self.inner.adapter_config(n))
            self.inner.remove_adapter(task)
            add_cat(self.inner, task, parts, dropout=dropout, head=head, head_state=head_state)
        if self.shared_name:
            self.inner.remove_adapter(self.shared_name)
        self.folded = True

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path) -> Path:
        """Trainable tensors, optimiser moments, weighting state and RNG (safetensors) + counters, samplers
        and history (JSON)."""
        path = Path(path)
        # written beside the target, then swapped in: a run killed while saving keeps its last checkpoint
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        names = {id(p): k for k, p in self.named.items()}
        tensors = {f"param::{k}": p.detach().contiguous().clone() for k, p in self.named.items()}
        for p, state in self._optimizer_state().items():
            for k, v in state.items():
                tensors[f"optim::{names[id(p)]}::{k}"] = (
                    v.detach().contiguous().clone() if torch.is_tensor(v) else torch.tensor(v)
                )
        tensors["rng::torch"] = torch.get_rng_state()
        for t, best in self._best_tensors.items():
            for k, v in best.items():
                tensors[f"best::{t}::{k}"] = v.contiguous()
        if isinstance(self.weighting, nn.Module):  # GradNorm's weights (uncertainty's are in `named`)
            tensors.update(
                {f"weighting::{k}": v.detach().clone() for k, v in self.weighting.state_dict().items()}
            )
        save_file(tensors, str(tmp / "state.safetensors"))
        meta = {"step": self.step, "sampler": self.sampler.state_dict(), "streams": {t: s.state() for t, s in self.streams.items()},
                "best": self.best, "history": self.history, "config": asdict(self.cfg),
                "weighting": _plain_state(self.weighting)}  # fmt: skip
        (tmp / "trainer_state.json").write_text(json.dumps(meta, default=float))
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    def _optimizer_state(self) -> dict:
        opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        return opt.state

    @torch.no_grad()
    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        old = path.with_name(f".{path.name}.old")
        if not (path / "trainer_state.json").is_file() and (old / "trainer_state.json").is_file():
            path = old  # killed between the two renames of save_checkpoint: the previous one is whole
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(
                f"no checkpoint in {path} (expected trainer_state.json and state.safetensors)"
            )
        meta = json.loads((path / "trainer_state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
        missing = [k for k in self.named if f"param::{k}" not in tensors]
        if missing:
            raise ValueError(
                f"checkpoint {path} does not match this run (no tensors for {missing[:3]}...): resume with the "
                "same tasks, adapters, sharing and weighting as the run that wrote it"
            )
        state = self._optimizer_state()
        for key, p in self.named.items():
            p.copy_(tensors[f"param::{key}"])
            moments = {k.split("::")[-1]: v for k, v in tensors.items() if k.startswith(f"optim::{key}::")}
            if moments:
                state[p] = moments
        if isinstance(self.weighting, nn.Module):
            own = {k[len("weighting::") :]: v for k, v in tensors.items() if k.startswith("weighting::")}
            self.weighting.load_state_dict(own)
        _load_plain_state(self.weighting, meta.get("weighting", {}))
        torch.set_rng_state(tensors["rng::torch"])
        self._best_tensors = {}
        for k, v in tensors.items():
            if k.startswith("best::"):
                _, t, name = k.split("::", 2)
                self._best_tensors.setdefault(t, {})[name] = v
        self.step = meta["step"]
        self.sampler.load_state_dict(meta["sampler"])
        for t, s in meta["streams"].items():
            self.streams[t].load(s)
        self.best, self.history = meta["best"], meta["history"]


def _allow_new_precision(mixed_precision: str) -> None:
    """Accelerate keeps one process-wide state, fixed by the first Accelerator: a second trainer asking
    for another precision in the same single process (a notebook, a script running several recipes)
    would be refused. There, drop that state (not the process group's PartialState) so the new one
    applies; distributed runs keep Accelerate's refusal, since every rank must agree."""
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if (
        state
        and state.get("_mixed_precision") not in (None, mixed_precision)
        and PartialState().num_processes == 1
    ):
        AcceleratorState._reset_state()


# JSON-able attributes of the weighting methods that change while training (DWA's loss history, GradNorm's
# initial losses); tensors go to safetensors.
_PLAIN_KEYS = ("history", "_sums", "_counts", "initial")


def _plain_state(weighting) -> dict:
    return {k: getattr(weighting, k) for k in _PLAIN_KEYS if hasattr(weighting, k)}


def _load_plain_state(weighting, state: dict) -> None:
    for k, v in state.items():
        setattr(weighting, k, v)
