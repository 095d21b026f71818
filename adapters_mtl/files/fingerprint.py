"""What identifies a base model: a fingerprint of its frozen backbone weights, and its Hub id."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import torch

from ..core.module_paths import module_list
from ..model import AdapterModel

__all__ = ["base_fingerprint", "base_id", "pin_base_fingerprint"]


def base_fingerprint(model: AdapterModel, *, whole_model: bool = False) -> str:
    """A fingerprint of the frozen backbone weights, independent of which adapters are attached.

    Of the backbone only (transformers' ``base_model``: the ``BertModel`` inside a
    ``BertForSequenceClassification``, the ``GPT2Model`` inside a ``GPT2LMHeadModel``), under its own tensor
    names: task heads (classifier, ``lm_head``) and the task model's prefix are left out, so an adapter
    made on one task class of a backbone loads into another class of the same weights. A bare backbone
    (``BertModel``, the packaged MiniLM) fingerprints exactly as before this rule.
    Hashes every backbone tensor's canonical name, shape and dtype plus a strided sample of up to 1024 of
    its values (all of them for small tensors): cheap enough to run on every load, and any other
    checkpoint, architecture or precision of the base gives a different value. Cached on the model
    until a base tensor moves, changes dtype or is edited in place.

    Args:
        model: the model whose base is fingerprinted.
        whole_model: hash the whole wrapped model under its own names, heads included: the rule of
            adapters_mtl 0.1.0 cards, whose fingerprints of task-class bases (``LlamaForCausalLM``,
            ``GPT2LMHeadModel``, ``BertForSequenceClassification``) differ from the backbone's. Not cached.

    Raises:
        RuntimeError: while an adapter is merged into the base weights.
    """

    if model.merged_adapter is not None:
        raise RuntimeError(
            f"adapter {model.merged_adapter!r} is merged; unmerge() before fingerprinting the base"
        )
    pinned = getattr(model, "_pinned_base_fingerprint", None)
    if pinned is not None and not whole_model:
        return pinned
    # cached, keyed by where each base tensor lives and its version counter (in-place edits,
    # .to(dtype/device) and load_state_dict all change the key)
    backbone = model.base if whole_model else getattr(model.base, "base_model", model.base)
    cache_key = None if whole_model else _base_state(backbone, model)
    cached = getattr(model, "_base_fingerprint", None)
    if cache_key is not None and cached is not None and cached[0] == cache_key:
        return cached[1]
    adapter_ids = {id(p) for n in model.adapter_names for p in model.adapter_parameters(n).values()}
    h = hashlib.sha256()
    # a wrapped layer keeps the original as base_layer (one level per method wrapping it): the canonical
    # name is the unwrapped one, so the value does not depend on which methods are attached
    named = [
        (re.sub(r"(\.base_layer)+\.", ".", k), t)
        for k, t in backbone.state_dict(keep_vars=True).items()
        if id(t) not in adapter_ids
    ]
    for tensor_name, t in sorted(named, key=lambda kv: kv[0]):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].to(torch.float32).cpu().contiguous()
        h.update(f"{tensor_name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    value = "sha256:" + h.hexdigest()
    if not whole_model:
        object.__setattr__(model, "_base_fingerprint", (cache_key, value))
    return value


# (modules, parameters): what one module contributes to the cache key (its own parameters dict, how many
# entries it had, and the base parameters among them by name)
_Layout = list[tuple[dict[str, Any], int, list[tuple[str, torch.nn.Parameter]]]]


def _base_state(backbone: torch.nn.Module, model: AdapterModel) -> tuple[tuple[Any, ...], ...]:
    """Where each frozen base parameter lives, its dtype, ``requires_grad`` and torch's in-place edit
    counter (``_version``, no public name): the cache key of :func:`base_fingerprint`.

    Flat in the number of attached adapters (it runs on every load): which parameters are the base's is
    worked out once per set of modules (:func:`_layout`) and kept with the exact module objects, so
    later calls list the modules (~0.4 ms on SmolLM2) and read ~270 parameters. Listing
    ``backbone.named_parameters()`` instead visits every adapter's parameters in every layer (30 ms per
    load with 64 SmolLM2 adapters attached). A module added, removed or replaced anywhere, or a parameter
    added to, removed from or replaced in a module, lays the base out again.
    """
    modules = module_list(backbone)
    cached = getattr(model, "_base_layout", None)
    if cached is None or cached[0] != modules or not _layout_holds(cached[1]):
        cached = (modules, _layout(backbone, model))
        object.__setattr__(model, "_base_layout", cached)
    return tuple(
        (p.data_ptr(), p.dtype, p.requires_grad, p._version)  # noqa: SLF001
        for _, _, params in cached[1]
        for _, p in params
    )


def _layout_holds(layout: _Layout) -> bool:
    return all(len(own) == count and all(own.get(k) is p for k, p in params) for own, count, params in layout)


def _layout(backbone: torch.nn.Module, model: AdapterModel) -> _Layout:
    """Each module's own parameters that are base weights: not owned by a method (``owns_parameter``).
    A method's per-adapter container (an ``nn.ParameterDict`` keyed by adapter names, e.g. ``lora_A``,
    ``ia3_l``, whose entries a method owns) is left out whole: its entries come and go with adapters."""
    methods = model.methods
    names = set(model.adapter_names)
    layout: _Layout = []
    for path, module in backbone.named_modules():
        own = module._parameters  # noqa: SLF001  (a module's own parameters; no public accessor)
        prefix = f"{path}." if path else ""
        if isinstance(module, torch.nn.ParameterDict) and own and own.keys() <= names:
            first = next(iter(own))
            if any(m.owns_parameter(prefix + first, own[first]) for m in methods):
                continue
        params = [
            (k, p)
            for k, p in own.items()
            if p is not None and not any(m.owns_parameter(prefix + k, p) for m in methods)
        ]
        layout.append((own, len(own), params))
    return layout


def pin_base_fingerprint(model: AdapterModel) -> str:
    """Compute :func:`base_fingerprint` now and keep it for the model's life: for a base about to become
    unreadable in one process, e.g. sharded over processes (FSDP), whose frozen weights no longer change.
    Saving an adapter from the sharded model then needs no collective read of the base."""
    value = base_fingerprint(model)
    object.__setattr__(model, "_pinned_base_fingerprint", value)
    return value


def base_id(model: AdapterModel) -> str | None:
    """The name a published adapter gives its base: a Hub id, never a path on this machine.

    ``config.name_or_path`` when it is a Hub-style id (``org/name``, as ``from_pretrained(hub_id)`` and the
    packaged models set it); ``None`` when it is a local folder (the card's ``base_model_type`` and the
    fingerprint still identify the base; set ``model.config.name_or_path = "org/name"`` to name it).
    """
    name = getattr(model.config, "_name_or_path", None) or None
    if not isinstance(name, str) or _is_local_path(name):
        return None
    return name


def _is_local_path(name: str) -> bool:
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or os.path.exists(name)
    )
