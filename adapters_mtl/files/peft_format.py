"""An adapter's tensors in PEFT's saved layout (the keys of PEFT's ``adapter_model.safetensors``).

Each method maps its own tensors (``Method.peft_state`` / ``load_peft_state``); this module joins the
parts of a multi-method adapter and reads module paths through ``core.module_paths`` (the backbone
alone or a task model around it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.module_paths import backbone_prefix, key_maps
from ..model import AdapterModel

__all__ = ["backbone_prefix", "load_peft_state_dict", "to_peft_state_dict"]


def to_peft_state_dict(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    """``name``'s tensors (every part, no head) under PEFT's saved key names, as contiguous copies."""
    out: dict[str, torch.Tensor] = {}
    for method in model.method_names(name):
        out.update(model.method(method).peft_state(name))
    return out


def load_peft_state_dict(model: AdapterModel, name: str, state: Mapping[str, torch.Tensor]) -> None:
    """Copy PEFT-layout tensors (any of ``name``'s parts, split by the methods' keys) into ``name``,
    which is attached with the matching configs.

    Raises:
        ValueError: listing every missing, unexpected or mis-shaped key at once; nothing is copied then.
    """
    methods = [model.method(m) for m in model.method_names(name)]
    parts: dict[str, dict[str, torch.Tensor]] = {m.name: {} for m in methods}
    problems = []
    for key, tensor in state.items():
        owner = next((m for m in methods if m.owns_peft_key(key)), None)
        if owner is None:
            problems.append(f"unexpected key {key} (the adapter's parts are {[m.name for m in methods]})")
        else:
            parts[owner.name][key] = tensor
    if problems:
        raise ValueError(f"cannot load tensors into adapter {name!r}: " + "; ".join(problems[:8]))
    load_parts(model, name, parts)


def load_parts(model: AdapterModel, name: str, parts: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Copy each method's saved PEFT state (``{method name: state}``) into ``name``; all or nothing.

    Raises:
        ValueError: every problem of every part at once; nothing is copied then.
    """
    maps = key_maps(model.base)
    methods = [model.method(m) for m in model.method_names(name)]
    missing = [m.name for m in methods if m.name not in parts]
    problems = [f"no saved tensors for the {m} part" for m in missing]
    if not problems:
        # (one part copies nothing on a problem; with several, a later part's problem undoes the earlier)
        snapshot = (
            {k: p.detach().clone() for k, p in model.adapter_parameters(name).items()}
            if len(methods) > 1
            else {}
        )
        for method in methods:
            problems += method.load_peft_state(name, parts[method.name], maps)
        if problems and snapshot:  # a later part failed: put back what earlier parts copied
            with torch.no_grad():
                for k, p in model.adapter_parameters(name).items():
                    p.copy_(snapshot[k])
    if problems:
        raise ValueError(f"cannot load tensors into adapter {name!r}: " + "; ".join(problems))
