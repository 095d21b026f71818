"""Training routed adapters under ``transformers.Trainer``, so users keep its callbacks, logging and loop.

- :func:`routed_dataset` concatenates several tasks' tokenized splits, each row tagged with its ``task``;
- :class:`RoutedCollator` pads a batch of such rows (tasks may mix in one batch) and carries each row's
  adapter (``adapters``), task (``tasks``) and labels (one Python object per row: their shape depends on
  the task kind);
- :class:`RoutedTrainer` is a ``Trainer`` whose loss is a routed forward ``model(**inputs, adapters=rows)``
  followed by each task's loss from its head (:func:`~adapters_mtl.training.objectives.task_loss`, the
  same as :class:`~adapters_mtl.training.MultiTaskTrainer` computes).

Checkpoints (``save_strategy``) hold the trainable parameters only (adapters and heads, safetensors, never a
pickle of the model), and resume into a model built the same way. Publish the trained adapters with
:func:`adapters_mtl.files.folder.save_adapter` or :meth:`adapters_mtl.registry.AdapterRegistry.publish`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from typing_extensions import override

from ..model import AdapterModel
from .objectives import collate, task_loss

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from ..data.tasks import TaskData

__all__ = ["RoutedCollator", "RoutedTrainer", "routed_dataset", "routed_loss"]

logger = logging.getLogger(__name__)

RouteEntry = str | tuple[str, ...] | None
# the columns a routed batch carries besides the tokenizer's model inputs
_ROUTING_COLUMNS = ("labels", "task")


def routed_dataset(
    tasks: Mapping[str, TaskData], tokenizer: PreTrainedTokenizerBase, split: str = "train"
) -> datasets.Dataset | torch.utils.data.ConcatDataset:
    """Every task's ``split`` tokenized (:meth:`TaskData.encode`) and concatenated, each row with a ``task``
    column naming its task; shuffle it (the Trainer's sampler does) to mix tasks in a batch.

    Returns:
        A ``datasets.Dataset`` when the tasks' labels fit one column (integer and float labels share a
        float column: the loss turns them back by task kind); a ``torch.utils.data.ConcatDataset`` of the
        tasks' datasets when they cannot (per-text next to per-token labels).

    Raises:
        ValueError: no tasks, or an empty split in every task.
    """
    import datasets

    if not tasks:
        raise ValueError("routed_dataset needs at least one task")
    parts = []
    for name, data in tasks.items():
        ds = data.encode(tokenizer, split)
        parts.append(ds.add_column("task", [name] * len(ds)))
    if not sum(len(p) for p in parts):
        raise ValueError(f"split {split!r} is empty in every task {list(tasks)}")
    labels = [p.features["labels"] for p in parts]
    if all(isinstance(f, datasets.Value) for f in labels) and len({f.dtype for f in labels}) > 1:
        parts = [p.cast_column("labels", datasets.Value("float64")) for p in parts]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError:  # features that cannot be aligned (e.g. a list of tags per row next to one label)
        return torch.utils.data.ConcatDataset(parts)


class RoutedCollator:
    """Pad a batch of :func:`routed_dataset` rows (right padding) and carry each row's routing.

    Args:
        tokenizer: pads the model inputs (``tokenizer.model_input_names``; other columns are dropped).
        routes: ``{task: routing entry}``: the adapter (a name, or a stack such as ``("shared", task)``)
            that a task's rows run through; default: the adapter named like the task.

    A batch is ``{model inputs (tensors), "adapters": [entry per row], "tasks": [task per row],
    "labels": [label per row]}``; ``model(**{k: v for k, v in batch.items() if k not in ("tasks",
    "labels")})`` is the routed forward.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, routes: Mapping[str, RouteEntry] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.routes = dict(routes or {})

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("RoutedCollator got an empty batch")
        missing = [c for c in _ROUTING_COLUMNS if c not in features[0]]
        if missing:
            raise KeyError(
                f"the rows lack {missing} (they have {sorted(features[0])}): build the dataset with "
                "routed_dataset(tasks, tokenizer, split), and if a Trainer other than RoutedTrainer drops "
                "columns, set TrainingArguments(remove_unused_columns=False)"
            )
        keep = {*self.tokenizer.model_input_names, "labels"}
        tasks = [str(f["task"]) for f in features]
        inputs, labels = collate(
            self.tokenizer, [{k: v for k, v in f.items() if k in keep} for f in features]
        )
        return {
            **inputs,
            "adapters": [self.routes.get(t, t) for t in tasks],
            "tasks": tasks,
            "labels": labels,
        }


def routed_loss(
    tasks: Mapping[str, TaskData],
    out: Any,
    rows: Sequence[str],
    labels: list,
    task_weights: Mapping[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a routed forward's output ``out`` whose row ``i`` belongs to task ``rows[i]``.

    Each task's loss is :func:`~adapters_mtl.training.objectives.task_loss` on its rows; the total is their
    mean weighted by each task's share of the rows (times ``task_weights``, default 1): for per-text tasks,
    the mean over the rows of each row's loss, what a single-task Trainer computes, whatever the batch mix.

    Returns:
        ``(total, {task: loss})``.

    Raises:
        KeyError: a row of a task not in ``tasks``.
    """
    unknown = sorted(set(rows) - set(tasks))
    if unknown:
        raise KeyError(f"rows of unknown task(s) {unknown}; the trainer knows {list(tasks)}")
    losses: dict[str, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for task in dict.fromkeys(rows):
        task_rows = [i for i, t in enumerate(rows) if t == task]
        losses[task] = task_loss(tasks[task], task, out, task_rows, labels)
        weight = (task_weights or {}).get(task, 1.0) * len(task_rows) / len(rows)
        total = weight * losses[task] if total is None else total + weight * losses[task]
    if total is None:
        raise ValueError("routed_loss got an empty batch")
    return total, losses


class _MethodHooks(TrainerCallback):
    """Calls each method's ``after_step`` after every optimiser step, before the gradients are zeroed (what
    e.g. AdaLoRA's rank allocation needs), as MultiTaskTrainer does."""

    def __init__(self, model: AdapterModel) -> None:
        self.model = model
        self.trained: list[str] = []

    @override
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.trained = [
            n
            for n in self.model.adapter_names
            if any(p.requires_grad for p in self.model.adapter_parameters(n).values())
        ]

    @override
    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for method in self.model.methods:
            method.after_step(self.trained, state.global_step + 1, state.max_steps)


class RoutedTrainer(Trainer):
    """``transformers.Trainer`` for an :class:`~adapters_mtl.AdapterModel` trained on several tasks at once.

    Each batch (from :class:`RoutedCollator`) runs as one routed forward, every row through its own
    adapter; the loss is :func:`routed_loss` (plus the methods' own terms, e.g. AdaLoRA's regulariser).
    Everything else is the Trainer's: callbacks, logging (``loss`` plus ``loss_<task>``, this process's
    mean since the last log), schedulers, gradient accumulation, mixed precision, DDP.

    Args:
        model: the AdapterModel; its base stays frozen, so the optimiser gets the adapters and heads only.
        tasks: ``{task: TaskData}``; a task's head is the adapter of the same name's.
        args: the usual ``TrainingArguments``.
        task_weights: optional ``{task: weight}`` on each task's loss (default 1).
        **kwargs: the Trainer's other arguments. ``data_collator`` defaults to ``RoutedCollator(processing_class)``.

    ``evaluate()`` reports ``eval_loss`` (the same loss, on the eval rows); per-task metrics (accuracy,
    F1...) come from :func:`~adapters_mtl.training.objectives.evaluate_task`, since the rows' logits have
    one width per task and do not stack into the Trainer's prediction arrays.

    Checkpoints hold the trainable parameters only (``model.safetensors``), so ``resume_from_checkpoint``
    and ``load_best_model_at_end`` need the model rebuilt with the same adapters. Publish adapters with
    :func:`adapters_mtl.files.folder.save_adapter` or an :class:`~adapters_mtl.registry.AdapterRegistry`.
    Multi-GPU: launch with ``torchrun``/``accelerate launch`` (DDP); ``nn.DataParallel`` cannot split the
    per-row routing lists and is refused.
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the gradient accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: AdapterModel,
        tasks: Mapping[str, TaskData],
        args: TrainingArguments | None = None,
        *,
        task_weights: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, AdapterModel):
            raise TypeError(f"RoutedTrainer trains an adapters_mtl.AdapterModel, got {type(model).__name__}")
        no_head = [t for t in tasks if not tasks[t].generative and model.head_config(t) is None]
        if no_head:
            raise ValueError(
                f"tasks {no_head} have no adapter with a head in the model: add_adapter(task, config, "
                "head=data.head_config()) for each"
            )
        if kwargs.get("data_collator") is None and kwargs.get("processing_class") is not None:
            kwargs["data_collator"] = RoutedCollator(kwargs["processing_class"])
        super().__init__(model, args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{self.args.n_gpu} GPUs in one process (nn.DataParallel) cannot split the per-row routing; "
                "launch one process per GPU (torchrun / accelerate launch) or set CUDA_VISIBLE_DEVICES"
            )
        if self.args.ddp_find_unused_parameters is False:
            raise ValueError(
                "ddp_find_unused_parameters=False: a batch without rows of some task leaves that adapter unused, "
                "which DDP then refuses; leave it unset (RoutedTrainer's DDP finds unused parameters)"
            )
        if self.args.label_smoothing_factor:
            raise ValueError(
                "label_smoothing_factor is not supported: each task's loss comes from its head "
                "(adapters_mtl.training.objectives.task_loss)"
            )
        self.tasks = dict(tasks)
        self.task_weights = dict(task_weights or {})
        self.model_accepts_loss_kwargs = False  # our loss is computed here, never inside the model
        self.adapter_model = model
        self._task_sums: dict[str, list[torch.Tensor]] = {}
        self.add_callback(_MethodHooks(model))

    @override
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,  # noqa: ARG002 (a per-batch mean, see above)
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The routed forward (``model(**inputs)``: ``inputs["adapters"]`` routes the rows) and
        :func:`routed_loss`, plus the methods' training terms for the routed adapters."""
        missing = [k for k in ("adapters", "tasks", "labels") if k not in inputs]
        if missing:
            raise KeyError(
                f"the batch lacks {missing} (it has {sorted(inputs)}): RoutedTrainer needs batches from "
                "RoutedCollator (the default data_collator when processing_class is given)"
            )
        inputs = dict(inputs)
        labels, rows = inputs.pop("labels"), inputs.pop("tasks")
        out = model(**inputs)
        loss, losses = routed_loss(self.tasks, out, rows, labels, self.task_weights)
        routed = [n for a in inputs["adapters"] for n in (a if isinstance(a, tuple) else (a,)) if n]
        terms = [t for m in self.adapter_model.methods if (t := m.training_loss(routed)) is not None]
        if terms:
            loss = loss + torch.stack(terms).sum()
        if model.training:
            for task, value in losses.items():
                self._task_sums.setdefault(task, []).append(value.detach())
        return (loss, out) if return_outputs else loss

    @override
    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,  # noqa: ARG002 (only the loss is ever returned)
        ignore_keys: list[str] | None = None,  # noqa: ARG002
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The batch's loss under ``no_grad``; no logits or labels (their width differs per task)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        assert isinstance(loss, torch.Tensor)
        return loss.detach(), None, None

    @override
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's logs, with ``loss_<task>`` (the mean since the last log) next to a training ``loss``."""
        if "loss" in logs and self._task_sums:
            for task, values in self._task_sums.items():
                logs[f"loss_{task}"] = round(torch.stack(values).float().mean().item(), 4)
            self._task_sums = {}
        super().log(logs, start_time)

    @override
    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns keeps what the collator reads: the base model's inputs, labels and task
        # (AdapterModel.forward takes **kwargs, from which the Trainer would infer nothing)
        if self._signature_columns is None:
            base = inspect.signature(self.adapter_model.base.forward).parameters
            # (Trainer annotates the attribute as None)
            self._signature_columns = [*base, *_ROUTING_COLUMNS]  # type: ignore[assignment]

    @override
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # the trainable parameters only (adapters and heads), never the frozen base; as copies, since LoRA
        # weights of several adapters are views of one stacked tensor
        if state_dict is None:
            state_dict = {
                n: p.detach().to("cpu", copy=True).contiguous()
                for n, p in self.adapter_model.named_parameters()
                if p.requires_grad
            }
        super()._save(output_dir, state_dict)

    @override
    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # checkpoints hold the trainable parameters only: the frozen base's keys are missing by design
        trainable = {n for n, p in self.adapter_model.named_parameters() if p.requires_grad}
        missing = [k for k in load_result.missing_keys if k in trainable]
        if missing:
            logger.warning(f"the checkpoint lacks trainable parameters {missing[:10]} (left as they were)")
        if load_result.unexpected_keys:
            logger.warning(
                f"the checkpoint has parameters this model lacks: {load_result.unexpected_keys[:10]}; "
                "rebuild the model with the same adapters before resuming"
            )
