"""Stack folding: a task trained as the stack (shared, task) of two LoRA adapters becomes one self-contained
LoRA adapter under the task's name, computing exactly what the stack computed (what the registry
publishes). Also the snapshots of a task's adapters that training keeps and folds.

A snapshot (see :func:`snapshot`) is ``{key: tensor}`` with the task's own keys as
:meth:`AdapterModel.adapter_parameters` names them, and the shared adapter's under ``shared/``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..methods.lora_factors import add_cat
from ..model import AdapterModel

__all__ = ["SHARED_PREFIX", "fold_stack", "restore", "snapshot"]

SHARED_PREFIX = "shared/"


def snapshot(model: AdapterModel, task: str, shared: str | None = None) -> dict[str, torch.Tensor]:
    """Copies of ``task``'s adapter and head, plus the ``shared`` adapter's under ``shared/`` (if any)."""
    snap = {k: p.detach().clone() for k, p in model.adapter_parameters(task).items()}
    if shared:
        snap.update(
            {f"{SHARED_PREFIX}{k}": p.detach().clone() for k, p in model.adapter_parameters(shared).items()}
        )
    return snap


@torch.no_grad()
def restore(model: AdapterModel, task: str, snap: Mapping[str, torch.Tensor]) -> None:
    """Write ``task``'s own tensors of the snapshot ``snap`` back into its live adapter and head."""
    for k, p in model.adapter_parameters(task).items():
        p.copy_(snap[k])


@torch.no_grad()
def fold_stack(model: AdapterModel, task: str, shared: str, snap: Mapping[str, torch.Tensor]) -> None:
    """Replace adapter ``task`` by one LoRA adapter equal to the stack (``shared``, ``task``) as held in the
    snapshot ``snap``: the factors are concatenated (rank = the sum of both ranks), the head is kept. The
    ``shared`` adapter stays attached (other tasks may still fold it).

    Raises:
        ValueError: ``task`` or ``shared`` is not only LoRA (see :meth:`AdapterModel.has_factors`).
    """
    own = {k: v for k, v in snap.items() if not k.startswith(SHARED_PREFIX)}
    shared_state = {k[len(SHARED_PREFIX) :]: v for k, v in snap.items() if k.startswith(SHARED_PREFIX)}
    parts = [(model.factors(shared, shared_state), 1.0), (model.factors(task, own), 1.0)]
    head = model.head_config(task)
    head_state = {k.split(".", 2)[2]: v for k, v in own.items() if k.startswith(f"heads.{task}.")}
    dropout = max(c.dropout for n in (shared, task) for c in model.adapter_config(n))
    model.remove_adapter(task)
    add_cat(model, task, parts, dropout=dropout, head=head, head_state=head_state)
