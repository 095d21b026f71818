"""MultiTaskTrainer: one adapter (and head) per task, trained jointly on Accelerate.

Reads top to bottom: set-up (accelerator, optimiser, samplers), loop (sample a task or one task per
row, routed forward, per-task losses, weighting, step), evaluate, checkpoint, finish (best adapters).
Checkpoints hold only what trains (adapter/head tensors and optimiser moments, as safetensors) plus
JSON state: nothing is pickled, and a resumed run ends with the same adapters as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..model import AdapterModel
from ..tasks import TaskData, accuracy, macro_f1
from .sampler import TaskSampler
from .weighting import make_weighting

__all__ = ["MultiTaskTrainer", "TrainConfig"]


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
        checkpoint_every: steps between checkpoints in ``output_dir/checkpoint``.
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

    def __post_init__(self) -> None:
        problems = []
        if self.batching not in ("per_task", "mixed"):
            problems.append(f"batching must be 'per_task' or 'mixed', got {self.batching!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            problems.append(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        for key in ("steps", "batch_size", "grad_accum", "eval_every"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                problems.append(f"{key} must be a positive int, got {getattr(self, key)!r}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))


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


class MultiTaskTrainer:
    """Train the adapters of ``tasks`` on ``model``.

    Args:
        model: an :class:`AdapterModel` holding one adapter with a head per task (same names as the tasks).
        tokenizer: the base model's tokenizer.
        tasks: ``{name: TaskData}``.
        config: :class:`TrainConfig`.
        shared: parameters shared by all tasks (for GradNorm/PCGrad); default: none.
    """

    def __init__(
        self, model: AdapterModel, tokenizer, tasks: dict[str, TaskData], config: TrainConfig, shared=()
    ) -> None:
        from accelerate import Accelerator
        from transformers import DataCollatorWithPadding

        missing = [t for t in tasks if t not in model.adapter_names or t not in model.heads]
        if missing:
            raise ValueError(
                f"tasks {missing} have no adapter with a head in the model; add_adapter(name, config, head=...) first"
            )
        self.cfg, self.tasks, self.shared = config, tasks, list(shared)
        torch.manual_seed(config.seed)
        from accelerate import DistributedDataParallelKwargs

        # adapters of tasks absent from a batch get no gradient: DDP must allow unused parameters
        self.acc = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.train_sets = {t: d.encode(tokenizer, "train") for t, d in tasks.items()}
        self.collate = DataCollatorWithPadding(tokenizer)
        self.tokenizer = tokenizer
        self.sampler = TaskSampler({t: len(ds) for t, ds in self.train_sets.items()}, config.sampling,
                                   temperature=config.temperature, total_steps=config.steps, seed=config.seed)  # fmt: skip
        self.streams = {
            t: _Stream(len(ds), config.seed + i) for i, (t, ds) in enumerate(self.train_sets.items())
        }
        self.weighting = make_weighting(config.weighting, list(tasks), **config.weighting_args)
        params = model.trainable_parameters()
        if isinstance(self.weighting, torch.nn.Module) and config.weighting == "uncertainty":
            params += list(self.weighting.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.inner = model
        self.step = 0
        self.history: list[dict] = []
        self.best: dict[str, dict] = {
            t: {"score": -math.inf, "step": 0, "bad_evals": 0, "stopped": False} for t in tasks
        }
        self._best_tensors: dict[str, dict[str, torch.Tensor]] = {}

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
        batch = self.collate([self.train_sets[t][i] for t, i in zip(rows, indices, strict=True)])
        return {k: v.to(self.acc.device) for k, v in batch.items()}, rows

    def _losses(self, batch: dict, rows: list[str]) -> dict[str, torch.Tensor]:
        labels = batch.pop("labels")
        out = self.model(**batch, adapters=rows)
        losses = {}
        for task, head in out.heads.items():
            y = labels.index_select(0, head.rows)
            if self.tasks[task].spec.kind == "regression":
                losses[task] = torch.nn.functional.mse_loss(head.logits.squeeze(-1).float(), y.float())
            else:
                losses[task] = torch.nn.functional.cross_entropy(head.logits.float(), y.long())
        return losses

    # ------------------------------------------------------------------ loop
    def train(self, resume_from: str | Path | None = None, stop_after: int | None = None) -> dict:
        """Run until ``config.steps`` (or ``stop_after`` steps in this call, for tests); returns the results.

        Raises:
            FileNotFoundError: ``resume_from`` has no checkpoint.
        """
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.cfg.steps, initial=self.step, disable=not self.acc.is_local_main_process, desc="train"
        )
        done_now = 0
        self.model.train()
        while self.step < self.cfg.steps and (stop_after is None or done_now < stop_after):
            for _ in range(self.cfg.grad_accum):
                with self.acc.accumulate(self.model):
                    batch, rows = self._batch()
                    losses = self._losses(batch, rows)
                    if hasattr(self.weighting, "total"):  # one weighted sum: backward through Accelerate
                        self.acc.backward(self.weighting.total(losses))
                        weights = self.weighting.last
                    else:  # gradient surgery / GradNorm work on per-task gradients themselves
                        weights = self.weighting.backward(losses, self.shared)
                    if self.acc.sync_gradients and self.cfg.max_grad_norm:
                        self.acc.clip_grad_norm_(self.inner.trainable_parameters(), self.cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            done_now += 1
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
                self.model.train()
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                if self.acc.is_main_process:  # one writer
                    self.save_checkpoint(Path(self.cfg.output_dir) / "checkpoint")
                self.acc.wait_for_everyone()
        bar.close()
        if self.step >= self.cfg.steps:
            self._restore_best()
        return {"step": self.step, "best": self.best, "history": self.history}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, task: str, split: str = "validation", batch_size: int = 64) -> dict[str, float]:
        """Accuracy and macro-F1 (classification) or MSE (regression) of ``task`` on ``split``."""
        data = self.tasks[task]
        ds = data.encode(self.tokenizer, split)
        self.model.eval()
        preds, gold = [], []
        for start in range(0, len(ds), batch_size):
            batch = self.collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
            labels = batch.pop("labels")
            out = self.model(**{k: v.to(self.acc.device) for k, v in batch.items()}, adapters=task)
            logits = out.heads[task].logits.float().cpu()
            preds.append(logits.squeeze(-1) if data.spec.kind == "regression" else logits.argmax(-1))
            gold.append(labels)
        p, g = torch.cat(preds).numpy(), torch.cat(gold).numpy()
        if data.spec.kind == "regression":
            return {"mse": float(((p - g) ** 2).mean()), "score": -float(((p - g) ** 2).mean())}
        return {
            "accuracy": accuracy(p, g),
            "macro_f1": macro_f1(p, g, data.label_names),
            "score": accuracy(p, g),
        }

    def _evaluate_all(self) -> None:
        for task in self.tasks:
            if self.best[task]["stopped"]:
                continue
            metrics = self.evaluate(task)
            self.history[-1].update({f"val/{task}/{k}": v for k, v in metrics.items()})
            best = self.best[task]
            if metrics["score"] > best["score"]:
                best.update(score=metrics["score"], step=self.step, bad_evals=0, metrics=metrics)
                self._best_tensors[task] = {
                    k: p.detach().clone() for k, p in self.inner.adapter_parameters(task).items()
                }
            else:
                best["bad_evals"] += 1
                if self.cfg.patience is not None and best["bad_evals"] >= self.cfg.patience:
                    best["stopped"] = True
                    self.inner.set_trainable(task, False)

    @torch.no_grad()
    def _restore_best(self) -> None:
        for task, tensors in self._best_tensors.items():
            for k, p in self.inner.adapter_parameters(task).items():
                p.copy_(tensors[k])

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path) -> Path:
        """Adapter/head tensors, optimiser moments and RNG (safetensors) + counters and samplers (JSON)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        names = {
            id(p): k
            for t in self.tasks
            for k, p in ((f"{t}::{k}", p) for k, p in self.inner.adapter_parameters(t).items())
        }
        tensors = {
            f"param::{names[id(p)]}": p.detach().contiguous().clone()
            for t in self.tasks
            for p in self.inner.adapter_parameters(t).values()
        }
        for p, state in (
            self.optimizer.optimizer.state.items()
            if hasattr(self.optimizer, "optimizer")
            else self.optimizer.state.items()
        ):
            key = names.get(id(p), f"extra{id(p)}")
            for k, v in state.items():
                tensors[f"optim::{key}::{k}"] = (
                    v.detach().contiguous().clone() if torch.is_tensor(v) else torch.tensor(v)
                )
        tensors["rng::torch"] = torch.get_rng_state()
        for t, best in self._best_tensors.items():
            for k, v in best.items():
                tensors[f"best::{t}::{k}"] = v.contiguous()
        save_file(tensors, str(path / "state.safetensors"))
        meta = {"step": self.step, "sampler": self.sampler.state_dict(), "streams": {t: s.state() for t, s in self.streams.items()},
                "best": self.best, "history": self.history, "config": asdict(self.cfg)}  # fmt: skip
        (path / "trainer_state.json").write_text(json.dumps(meta, default=float))
        return path

    @torch.no_grad()
    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(
                f"no checkpoint in {path} (expected trainer_state.json and state.safetensors)"
            )
        meta = json.loads((path / "trainer_state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
        params = {f"{t}::{k}": p for t in self.tasks for k, p in self.inner.adapter_parameters(t).items()}
        for key, p in params.items():
            p.copy_(tensors[f"param::{key}"])
        opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        for key, p in params.items():
            state = {k.split("::")[-1]: v for k, v in tensors.items() if k.startswith(f"optim::{key}::")}
            if state:
                opt.state[p] = state
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
