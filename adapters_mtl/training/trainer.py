"""MultiTaskTrainer: one adapter (and head) per task, trained jointly on Accelerate.

Reads top to bottom: set-up (accelerator, batch source, weighting, optimiser), loop (a batch of one task
or a task per row, routed forward, per-task losses, weighting, step), evaluate (early stopping), save
(checkpoints), finish (best adapters, folded stacks). Its parts live beside it: :mod:`.config` (the
settings), :mod:`.batches` (what each step trains on), :mod:`.weighting` (how task losses combine),
:mod:`.early_stopping`, :mod:`.checkpoint` (the format on disk), :mod:`.folding` (shared stacks into one
adapter per task) and :mod:`.accelerator`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import get_scheduler

from ..core.heads import pool
from ..data.tasks import TaskData
from ..model import AdapterModel
from .accelerator import fsdp_requested, make_accelerator, shard_frozen_base
from .adversarial import TaskDiscriminator
from .batches import Batch, BatchSource
from .checkpoint import Checkpointer
from .config import TrainConfig
from .early_stopping import EarlyStopping
from .folding import fold_stack, restore, snapshot
from .objectives import evaluate_task, task_loss
from .run_state import MetricsLog, StopRequest, TrainingInterrupted, crash_point
from .sampler import TaskSampler
from .soft_sharing import check_soft_sharing, soft_sharing_penalty
from .weighting import make_weighting, needs_shared

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["MultiTaskTrainer", "TrainConfig", "TrainingInterrupted"]


class _TrainStep(nn.Module):
    """What Accelerate prepares (and DDP wraps): the routed model plus the optional task discriminator, so
    the discriminator's gradients are synchronised like the adapters'."""

    def __init__(self, model: AdapterModel, discriminator: TaskDiscriminator | None) -> None:
        super().__init__()
        self.model, self.discriminator = model, discriminator

    def forward(
        self, adapters: list, discriminate_from: int | None = None, **inputs: torch.Tensor
    ) -> tuple[Any, torch.Tensor | None]:
        out = self.model(**inputs, adapters=adapters)
        if discriminate_from is None or self.discriminator is None:
            return out, None
        # the shared adapter's own representation of rows [discriminate_from:], mean-pooled over tokens
        mask = inputs["attention_mask"][discriminate_from:]
        pooled = pool(out.last_hidden_state[discriminate_from:], mask, "mean", None)  # (B, H)
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

    Attributes:
        model: the :class:`AdapterModel` trained (unwrapped: evaluation and folding use it).
        prepared: what Accelerate prepared and the loop calls: ``step_module``, DDP-wrapped when distributed.
        step_module: the routed model plus the task discriminator (``step_module.discriminator``, or None).
        acc: the Accelerator.
        global_step: optimiser steps done.
        history: one row of metrics per step (``loss/<task>``, ``weight/<task>``, ``val/<task>/<metric>``).
        trainable: every parameter the optimiser updates, under its checkpoint key.
        unfrozen: the base-model parameters trained too (``config.unfreeze``), by name.
        batches / weighting / early_stopping / checkpointer: the parts (see the module docstring).

    Raises:
        ValueError: a task without an adapter (or head), causal-LM and head tasks mixed, a sharing set-up
            the model does not have, GradNorm/PCGrad without shared parameters, an ``unfreeze`` matching
            nothing.
    """

    def __init__(
        self,
        model: AdapterModel,
        tokenizer: PreTrainedTokenizerBase,
        tasks: dict[str, TaskData],
        config: TrainConfig,
        shared: Sequence[nn.Parameter] = (),
    ) -> None:
        _check_tasks(model, tasks)
        self.cfg, self.tasks, self.tokenizer = config, tasks, tokenizer
        self.shared_name = None if config.sharing in ("none", "soft") else config.shared_adapter
        if self.shared_name is not None:
            _check_sharing(model, tasks, config.sharing, self.shared_name)
        if config.sharing == "soft":
            check_soft_sharing(model, list(tasks))
        fsdp = fsdp_requested(config.fsdp)  # the flag, or an `accelerate launch` FSDP config
        if fsdp and any(d.generative for d in tasks.values()):
            raise ValueError(
                "fsdp with causal_lm tasks is not supported yet: generation calls the base's generate(), "
                "which bypasses the sharded root's gathering; train them without fsdp"
            )
        if fsdp and config.unfreeze != "none":
            raise ValueError(
                f"fsdp shards the frozen base; unfreeze={config.unfreeze!r} would train base weights it "
                "keeps whole on every process and the published base fingerprint would be stale: use "
                "unfreeze: none with fsdp"
            )
        unknown_lr = sorted(set(config.task_lr) - {*tasks, *([self.shared_name] if self.shared_name else [])})
        if unknown_lr:
            raise ValueError(f"task_lr names {unknown_lr}, which are not tasks of this run: {sorted(tasks)}")
        self.shared = list(shared) or (
            list(model.adapter_parameters(self.shared_name).values()) if self.shared_name else []
        )
        if needs_shared(config.weighting) and not self.shared:
            raise ValueError(
                f"weighting {config.weighting!r} works on per-task gradients of shared parameters and there "
                "are none: set sharing: shared (a shared adapter stacked under the task adapters) or pick "
                "static, uncertainty or dwa"
            )
        torch.manual_seed(config.seed)
        self.acc = make_accelerator(
            mixed_precision=config.mixed_precision,
            grad_accum=config.grad_accum,
            log_with=config.log_with,
            project_dir=config.output_dir,
        )
        if config.log_with:
            self.acc.init_trackers("train", config={k: str(v) for k, v in asdict(config).items()})
        train_sets = {t: d.encode(tokenizer, "train") for t, d in tasks.items()}
        if config.epochs is not None:  # passes over the training rows -> optimiser steps
            rows = sum(len(ds) for ds in train_sets.values())
            per_step = config.batch_size * self.acc.num_processes * config.grad_accum
            config = replace(config, epochs=None, steps=max(1, math.ceil(config.epochs * rows / per_step)))
            config.epochs = None
            self.cfg = config
        sampler = TaskSampler(
            {t: len(ds) for t, ds in train_sets.items()},
            config.sampling,
            temperature=config.temperature,
            total_steps=config.total_steps,
            seed=config.seed,
        )
        self.batches = BatchSource(
            train_sets,
            tokenizer,
            sampler,
            batch_size=config.batch_size,
            batching=config.batching,
            seed=config.seed,
            num_processes=self.acc.num_processes,
            process_index=self.acc.process_index,
            device=self.acc.device,
        )
        self.weighting = make_weighting(config.weighting, list(tasks), **config.weighting_args)
        discriminator = None
        if config.sharing == "adversarial":
            ref = next(model.base.parameters())
            discriminator = TaskDiscriminator(model.hidden_size, len(tasks), lambda_=config.grl_lambda)
            discriminator.to(device=ref.device)
        self.model = model
        if config.activation_checkpointing:
            model.activation_checkpointing_enable()
        self.step_module = _TrainStep(model, discriminator)
        self.unfrozen = _unfreeze(model, config.unfreeze)
        self.trainable = self._trainable_parameters()
        if fsdp:  # the frozen base sharded; trainable parameters stay whole (DDP)
            shard_frozen_base(self.step_module, model, self.acc.device)
        optimizer = torch.optim.AdamW(
            _param_groups(self.trainable, config), lr=config.lr, weight_decay=config.weight_decay
        )
        self.prepared, self.optimizer = self.acc.prepare(self.step_module, optimizer)
        # stepped by hand on real optimiser steps (not prepared: Accelerate would step it per process)
        self.scheduler = get_scheduler(
            config.scheduler,
            self.optimizer,
            num_warmup_steps=config.warmup(),
            num_training_steps=config.total_steps,
            scheduler_specific_kwargs=dict(config.scheduler_args),
        )
        self.global_step = 0
        self.folded = False
        self.history: list[dict] = []
        settled = {
            t: max(self.model.method(m).settles_at(t, config.total_steps) for m in self.model.method_names(t))
            for t in tasks
            if self.model.method_names(t)
        }
        self.early_stopping = EarlyStopping(list(tasks), config.patience, settled)
        self.checkpointer = Checkpointer(
            self.trainable, self.optimizer, self.weighting, self.batches, self.early_stopping, asdict(config)
        )

    def _trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter the optimiser updates, under a stable name (checkpoint keys)."""
        named = {f"{t}::{k}": p for t in self.tasks for k, p in self.model.adapter_parameters(t).items()}
        named.update({f"base::{n}": p for n, p in self.unfrozen.items()})
        if self.shared_name:
            shared = self.model.adapter_parameters(self.shared_name)
            named.update({f"{self.shared_name}::{k}": p for k, p in shared.items()})
        named.update({f"weighting::{k}": p for k, p in self.weighting.trainable_parameters().items()})
        if self.step_module.discriminator is not None:
            named.update(
                {f"discriminator::{k}": p for k, p in self.step_module.discriminator.named_parameters()}
            )
        return named

    def _route(self, task: str) -> str | tuple[str, str]:
        """The adapter (or stack) rows of ``task`` run through."""
        return (self.shared_name, task) if self.shared_name and not self.folded else task

    # ------------------------------------------------------------------ loop
    def train(self, resume_from: str | Path | None = None, stop_after: int | None = None) -> dict[str, Any]:
        """Run until ``config.steps`` (or ``stop_after`` steps in this call, for tests).

        ``output_dir/metrics.csv`` grows a row per step as training goes. The first Ctrl-C (SIGINT) ends the
        run after the current step with a checkpoint in ``output_dir/checkpoint``.

        Returns:
            ``{"step": steps done, "best": EarlyStopping.best, "history": one row per step}``.

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
            total=self.cfg.total_steps,
            initial=self.global_step,
            disable=not self.acc.is_local_main_process,
            desc="train",
        )
        done_now = 0
        checkpoint = Path(self.cfg.output_dir) / "checkpoint"
        self.prepared.train()
        with StopRequest() as stop:
            # the run also ends when early stopping has stopped every task (nothing left to train)
            while (
                self.global_step < self.cfg.total_steps
                and self.early_stopping.active()
                and (stop_after is None or done_now < stop_after)
            ):
                self._train_step(bar)
                done_now += 1
                if log is not None:
                    log.append(self.history[-1], self.history)
                if self._stop_requested(stop):
                    self._save_from_main(checkpoint)
                    bar.close()
                    raise TrainingInterrupted(checkpoint, self.global_step)
                if self.cfg.checkpoint_every and self.global_step % self.cfg.checkpoint_every == 0:
                    self._save_from_main(checkpoint)
                crash_point(self.global_step)
        bar.close()
        if self.global_step >= self.cfg.total_steps or not self.early_stopping.active():
            self.restore_best()
            if self.cfg.log_with:
                self.acc.end_training()
        return {"step": self.global_step, "best": self.early_stopping.best, "history": self.history}

    def _train_step(self, bar: Any) -> None:
        """One optimiser step (``grad_accum`` batches), its history row and, when due, the evaluation."""
        for _ in range(self.cfg.grad_accum):
            with self.acc.accumulate(self.prepared):
                batch = self.batches.draw(self.global_step, self.early_stopping.active())
                losses = self._losses(batch)
                weights = self._backward(losses)
                if self.acc.sync_gradients and self.cfg.max_grad_norm:
                    self.acc.clip_grad_norm_(list(self.trainable.values()), self.cfg.max_grad_norm)
                self.optimizer.step()
                if self.acc.sync_gradients:  # a real step, gradients still in .grad: methods' schedules
                    self.scheduler.step()
                    trained = [*self.tasks, *([self.shared_name] if self.shared_name else [])]
                    for method in self.model.methods:
                        method.after_step(trained, self.global_step + 1, self.cfg.total_steps)
                self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        row = {
            "step": self.global_step,
            **{f"loss/{t}": v.item() for t, v in losses.items()},
            **{f"weight/{t}": w for t, w in weights.items()},
        }
        self.history.append(row)
        bar.update(1)
        bar.set_postfix({t: f"{v.item():.3f}" for t, v in losses.items()})
        if self.global_step % self.cfg.eval_every == 0 or self.global_step == self.cfg.total_steps:
            self._evaluate_all()
            self.weighting.end_epoch()  # DWA's "epochs" are eval_every steps
            self.prepared.train()
        if self.cfg.log_with:
            self.acc.log({k: v for k, v in self.history[-1].items() if k != "step"}, step=self.global_step)

    def _losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-task losses, plus ``"adversary"`` (the discriminator's loss) with adversarial sharing,
        ``"soft_sharing"`` (the weighted pull towards the tasks' mean adapter, :mod:`.soft_sharing`) and
        ``"regulariser"`` (the methods' :meth:`~adapters_mtl.methods.Method.training_loss` terms)."""
        inputs, rows = batch.inputs, batch.rows
        adapters: list[str | tuple[str, str] | None] = [self._route(t) for t in rows]
        adversarial = self.step_module.discriminator is not None
        if adversarial:  # the same rows again through the shared adapter alone, in the same routed call
            inputs = {k: torch.cat([v, v]) for k, v in inputs.items()}  # (2B, T)
            adapters = adapters + [self.shared_name] * len(rows)
        out, disc_logits = self.prepared(adapters, len(rows) if adversarial else None, **inputs)
        losses = {}
        for task in dict.fromkeys(rows):
            task_rows = [i for i, t in enumerate(rows) if t == task]
            losses[task] = task_loss(self.tasks[task], task, out, task_rows, batch.labels)
        if adversarial:
            task_ids = torch.tensor([list(self.tasks).index(t) for t in rows], device=disc_logits.device)
            losses["adversary"] = torch.nn.functional.cross_entropy(disc_logits.float(), task_ids)
        routed = [n for a in adapters for n in (a if isinstance(a, tuple) else (a,)) if n is not None]
        terms = [t for m in self.model.methods if (t := m.training_loss(routed)) is not None]
        if terms:  # the methods' own terms for the routed adapters (e.g. AdaLoRA's regulariser)
            losses["regulariser"] = torch.stack(terms).sum()
        if self.cfg.sharing == "soft" and self.cfg.soft_weight:
            losses["soft_sharing"] = self.cfg.soft_weight * soft_sharing_penalty(self.model, list(self.tasks))
        return losses

    def _backward(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """Backward the step's losses (the weighting decides how); returns the task weights used."""
        terms = {k: losses.pop(k) for k in _EXTRA_TERMS if k in losses}  # not task losses: not weighted
        extra: torch.Tensor | float = sum(
            (self.cfg.adversarial_weight * v if k == "adversary" else v for k, v in terms.items()), 0.0
        )
        if self.weighting.weighted_sum:  # one weighted sum: backward through Accelerate (loss scaling)
            self.acc.backward(self.weighting.total(losses) + extra)
            weights = self.weighting.last
        else:  # gradient surgery / GradNorm work on per-task gradients themselves (they add to .grad)
            if isinstance(extra, torch.Tensor):
                self.acc.backward(extra, retain_graph=True)
            # divided like acc.backward divides a loss (gradient accumulation averages the micro-batches)
            scale = 1.0 / self.cfg.grad_accum
            weights = self.weighting.backward({t: v * scale for t, v in losses.items()}, self.shared)
        losses.update(terms)  # logged beside the task losses
        return weights

    def _stop_requested(self, stop: StopRequest) -> bool:
        if self.acc.num_processes == 1:
            return stop.requested
        # every rank must stop after the same step, or the next step's collectives would hang
        flag = torch.tensor([float(stop.requested)], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self, task: str, split: str = "validation", batch_size: int = 64, report: bool = False
    ) -> dict[str, Any]:
        """Metrics of ``task`` on ``split`` (see :mod:`.objectives`): accuracy and macro-F1 for
        classification (also as generation), MSE for regression, loss and perplexity for generation;
        ``score`` is what early stopping maximises; ``report`` adds a per-class report."""
        was_training = self.model.training
        self.model.eval()
        try:  # every process evaluates the whole split on the unwrapped model (no DDP collectives)
            return evaluate_task(
                self.model,
                self.tasks[task],
                self.tokenizer,
                self._route(task),
                self.acc.device,
                split,
                batch_size,
                report,
            )
        finally:
            self.model.train(was_training)

    def _evaluate_all(self) -> None:
        for task in self.tasks:
            if self.early_stopping.stopped(task):
                continue
            metrics = self.evaluate(task)
            self.history[-1].update({f"val/{task}/{k}": v for k, v in metrics.items()})
            take = functools.partial(snapshot, self.model, task, self.shared_name)
            if self.early_stopping.record(task, metrics, self.global_step, take):
                self.model.set_trainable(task, False)

    @torch.no_grad()
    def restore_best(self) -> None:
        """Put each task's best adapter back; with sharing, fold its best (shared, task) stack into one
        self-contained LoRA adapter under the task's name (what the registry publishes) and drop the shared
        adapter. ``train`` calls this when the run ends; calling it again does nothing."""
        if self.folded:
            return
        for task in self.tasks:
            snap = self.early_stopping.tensors.get(task) or snapshot(self.model, task, self.shared_name)
            if self.shared_name:
                fold_stack(self.model, task, self.shared_name, snap)
            else:
                restore(self.model, task, snap)
        if self.shared_name:
            self.model.remove_adapter(self.shared_name)
        self.folded = True

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the run's checkpoint to the folder ``path`` (see :mod:`.checkpoint`); returns ``path``."""
        return self.checkpointer.save(path, self.global_step, self.history)

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from the checkpoint in ``path``.

        Raises:
            FileNotFoundError: no checkpoint there. ValueError: it was written by another set-up.
        """
        self.global_step, self.history = self.checkpointer.load(path)
        # the schedule is a function of the step: put it where the checkpoint's run was
        self.scheduler.last_epoch = self.global_step
        for group, base, fn in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * fn(self.global_step)

    def _save_from_main(self, path: Path) -> None:
        if self.acc.is_main_process:  # one writer
            self.save_checkpoint(path)
        self.acc.wait_for_everyone()


_EXTRA_TERMS = ("adversary", "regulariser", "soft_sharing")


def _param_groups(trainable: dict[str, nn.Parameter], config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW's groups: per task its learning rate (``task_lr``, else ``lr``; unfrozen base weights
    ``base_lr``), and within each, matrices with weight decay and 1-D parameters (biases, norms, IA3
    vectors, DoRA magnitudes) without."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for key, p in trainable.items():
        owner = key.split("::", 1)[0]
        lr = config.base_lr if owner == "base" else float(config.task_lr.get(owner, config.lr))
        decays = p.dim() >= 2 and "norm" not in key.lower()
        groups.setdefault((lr, decays), []).append(p)
    return [
        {"params": ps, "lr": lr, "weight_decay": config.weight_decay if decays else 0.0}
        for (lr, decays), ps in groups.items()
    ]


def _check_tasks(model: AdapterModel, tasks: dict[str, TaskData]) -> None:
    missing = [t for t in tasks if t not in model.adapter_names]
    headless = [
        t for t, d in tasks.items() if not d.generative and t in model.adapter_names and t not in model.heads
    ]
    if missing or headless:
        raise ValueError(
            f"tasks {missing + headless} have no adapter{' with a head' if headless else ''} in the model; "
            "add_adapter(name, config, head=data.head_config()) for each task first"
        )
    empty = {t: s for t, d in tasks.items() for s in ("train", "validation") if len(d.splits[s]) == 0}
    if empty:
        raise ValueError(
            f"tasks {sorted(empty)} have an empty split ({empty}): training draws from train and early stopping "
            "reads validation; give them rows (TaskSpec splits / limit, or a validation source)"
        )
    if len({d.generative for d in tasks.values()}) > 1:
        raise ValueError(
            "causal_lm tasks (trained through the base LM head) cannot be trained with head tasks in one "
            f"trainer: {[t for t, d in tasks.items() if d.generative]} vs {[t for t, d in tasks.items() if not d.generative]}; "
            "train them separately, or make every task causal_lm (classification as generation)"
        )


def _foldable(model: AdapterModel, name: str) -> bool:
    """Whether ``name`` is a low-rank weight update the stacks can be folded with (checked per adapter:
    a DoRA adapter is LoRA's method but no plain low-rank update)."""
    try:
        return model.has_factors(name) and bool(model.factors(name))
    except ValueError:
        return False


def _check_sharing(model: AdapterModel, tasks: dict[str, TaskData], sharing: str, name: str) -> None:
    if name not in model.adapter_names:
        raise ValueError(
            f"sharing={sharing!r} needs a shared LoRA adapter named {name!r} in the model: "
            f"add_adapter({name!r}, LoraConfig(...)) without a head (or set shared_adapter)"
        )
    if name in tasks or name in model.heads:
        raise ValueError(f"the shared adapter {name!r} must not be a task and must not have a head")
    not_lora = [n for n in [name, *tasks] if not _foldable(model, n)]
    if not_lora:
        raise ValueError(
            f"sharing folds each (shared, task) stack into one LoRA adapter, so every adapter must be LoRA "
            f"only; {not_lora} are not. Use sharing: none for prefix adapters."
        )


def _unfreeze(model: AdapterModel, unfreeze: str) -> dict[str, nn.Parameter]:
    """The base parameters ``unfreeze`` names (``none``, ``all`` or a regular expression), now trainable."""
    if unfreeze == "none":
        return {}
    pattern = None if unfreeze == "all" else re.compile(unfreeze)
    chosen = {n: p for n, p in model.base_parameters().items() if pattern is None or pattern.search(n)}
    if not chosen:
        raise ValueError(f"unfreeze={unfreeze!r} matches no base-model parameter name")
    for p in chosen.values():
        p.requires_grad_(True)
    return chosen
