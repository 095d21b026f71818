"""Soft parameter sharing: one adapter per task, pulled towards the tasks' mean by a penalty.

The third sharing mode of the multi-task literature, beside hard sharing (one shared adapter) and the
hierarchical stack (shared + task adapters): every task keeps its own adapter, and
``weight · (1/K) Σ_t ‖θ_t − θ̄‖²`` (θ̄ the tasks' mean, parameter by parameter) is added to the loss
(Duong et al. 2015 use the L2 distance between two tasks' parameters; the mean is its K-task form). Its
gradient on task t is ``weight · (2/K)(θ_t − θ̄)`` (the mean's own terms cancel, as Σ_t (θ_t − θ̄) = 0);
weight 0 is independent training, a large weight ties the adapters into one. Heads are task-specific
(their label sets differ) and never pulled.

The adapters must have the same parameters (names and shapes: the same method configuration). For the
pull to mean "the same update", they should also start from the same values: :func:`start_alike` copies
the first task's initial adapter into the others (a recipe does this for the adapters it creates; it would
overwrite trained adapters, so the trainer never does it itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..model import AdapterModel

__all__ = ["check_soft_sharing", "soft_sharing_penalty", "start_alike"]


def _adapter_only(model: AdapterModel, task: str) -> dict[str, nn.Parameter]:
    """``task``'s adapter parameters without its head, keyed by the task-independent names."""
    return {k: p for k, p in model.adapter_parameters(task).items() if not k.startswith("heads.")}


def check_soft_sharing(model: AdapterModel, tasks: Sequence[str]) -> None:
    """Raise a ValueError unless the ``tasks``' adapters can be pulled together (≥ 2 tasks, the same
    parameter names and shapes)."""
    if len(tasks) < 2:
        raise ValueError(f"sharing: soft pulls several tasks' adapters together; this run has {list(tasks)}")
    shapes = {t: {k: tuple(p.shape) for k, p in _adapter_only(model, t).items()} for t in tasks}
    first = tasks[0]
    empty = [t for t in tasks if not shapes[t]]
    if empty:
        raise ValueError(
            f"sharing: soft pulls adapter parameters together and {empty} have none (head-only tasks): "
            "give every task an adapter (e.g. adapter: {lora: {r: 8}})"
        )
    differ = [t for t in tasks[1:] if shapes[t] != shapes[first]]
    if differ:
        detail = {t: sorted(set(shapes[t].items()) ^ set(shapes[first].items()))[:3] for t in differ}
        raise ValueError(
            f"sharing: soft needs every task adapter to have the same parameters (the same method config); "
            f"{differ} differ from {first!r}: {detail}. Give the tasks one adapter config."
        )


def soft_sharing_penalty(model: AdapterModel, tasks: Sequence[str]) -> torch.Tensor:
    """``(1/K) Σ_t ‖θ_t − θ̄‖²`` over the ``tasks``' adapter parameters (a scalar, differentiable)."""
    per_task = [_adapter_only(model, t) for t in tasks]
    total: torch.Tensor | None = None
    for key in per_task[0]:
        stacked = torch.stack([params[key].float() for params in per_task])  # (K, *shape)
        term = (stacked - stacked.mean(0, keepdim=True)).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError(
            f"sharing: soft: the tasks {list(tasks)} have no adapter parameters to pull together"
        )
    return total / len(tasks)


@torch.no_grad()
def start_alike(model: AdapterModel, tasks: Sequence[str]) -> None:
    """Copy the first task's adapter values (not its head) into the other tasks' adapters."""
    check_soft_sharing(model, tasks)
    source = _adapter_only(model, tasks[0])
    for task in tasks[1:]:
        for key, p in _adapter_only(model, task).items():
            p.copy_(source[key])
