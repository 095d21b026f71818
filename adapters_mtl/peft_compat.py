"""Adapter tensors in PEFT's saved layout (the keys of PEFT's ``adapter_model.safetensors``).

PEFT's own ``get_peft_model_state_dict`` needs a ``PeftModel``; our layers are not PEFT's, so the key
mapping is written here (a few lines, no copy of PEFT code). Keys:
``base_model.model.<module path>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r) and, for
prefix tuning, ``prompt_embeddings`` (P, L·2·H·D).

The module path is the one in the model PEFT wrapped: ``bert.encoder.layer.0...`` for a
``BertForSequenceClassification``, ``encoder.layer.0...`` for a ``BertModel``. Saving writes the names
of the model we wrap (so PEFT on the same class reads them); loading also accepts the names of the
backbone alone or of a task model around it (see :func:`backbone_prefix`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .model import AdapterModel

__all__ = ["backbone_prefix", "load_peft_state_dict", "to_peft_state_dict"]

_PEFT_PREFIX = "base_model.model."


def backbone_prefix(base: nn.Module) -> tuple[str, bool]:
    """Where a transformers model's backbone sits in task-model key names.

    Args:
        base: the wrapped model (``AdapterModel.base``).

    Returns:
        ``(prefix, wrapped)``: for a task model (``BertForSequenceClassification``, ``GPT2LMHeadModel``,
        ``LlamaForCausalLM``) the path of its backbone (``"bert"``, ``"transformer"``, ``"model"``) and
        True; for a bare backbone (``BertModel``) the prefix a task model puts it under (transformers'
        ``base_model_prefix``) and False; ``("", False)`` for a module that is not a transformers model.
    """
    inner = getattr(base, "base_model", base)
    if inner is not base:
        path = next((n for n, m in base.named_modules() if m is inner), "")
        return path, bool(path)
    return getattr(base, "base_model_prefix", "") or "", False


def _key_maps(base: nn.Module) -> list[tuple[str, Callable[[str], str | None]]]:
    """Ways to read a saved module path: as is, then with the backbone prefix added or removed."""
    prefix, wrapped = backbone_prefix(base)
    maps: list[tuple[str, Callable[[str], str | None]]] = [("as saved", lambda k: k)]
    if prefix and wrapped:  # saved on the bare backbone, loaded into the task model
        maps.append((f"with {prefix + '.'!r} added", lambda k: f"{prefix}.{k}"))
    elif prefix:  # saved on a task model, loaded into its bare backbone
        cut = prefix + "."
        maps.append((f"with {cut!r} removed", lambda k: k[len(cut) :] if k.startswith(cut) else None))
    return maps


def _native_names(base: nn.Module, keys: list[str], lora: set[str]) -> tuple[dict[str, str], list[str]]:
    """Map saved LoRA keys to the adapter's LoRA parameter names (``lora``) with the first key map under
    which every key names a distinct parameter.

    Returns:
        ``({saved key: native name}, problems)``; with problems, the map matching the most keys.
    """
    maps = _key_maps(base)
    best: dict[str, str] = {}
    for _, fn in maps:
        native = {k: fn(k.removeprefix(_PEFT_PREFIX).removesuffix(".weight")) for k in keys}
        hits = {k: n for k, n in native.items() if n in lora}
        if len(set(hits.values())) != len(hits):  # two saved keys onto one parameter: not this map
            continue
        if len(hits) == len(keys):
            return hits, []
        best = hits if len(hits) > len(best) else best
    unexpected = [k for k in keys if k not in best]
    problems = [f"unexpected key {k}" for k in unexpected[:8]]
    if len(unexpected) > 8:
        problems.append(f"... and {len(unexpected) - 8} more unexpected keys")
    if lora:
        problems.append(
            f"module paths were tried {' and '.join(h for h, _ in maps)}; this model's LoRA factors are "
            f"named like {sorted(lora)[0]!r} (was the adapter made on another architecture or for other modules?)"
        )
    else:
        problems.append("the adapter has no LoRA part, but the file holds LoRA tensors")
    return best, problems


def to_peft_state_dict(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    """``name``'s tensors under PEFT's saved key names (contiguous copies, safe for safetensors)."""
    out: dict[str, torch.Tensor] = {}
    for key, p in model.adapter_parameters(name).items():
        if key.startswith("heads."):
            continue
        if key.endswith(".lora_A") or key.endswith(".lora_B"):
            out[f"{_PEFT_PREFIX}{key}.weight"] = p.detach().contiguous().clone()
    if "prefix" in {c.method for c in model.adapter_config(name)}:
        with torch.no_grad():
            out["prompt_embeddings"] = (
                model._methods["prefix"].bank.prefixes[name].kv().detach().contiguous().clone()
            )
    return out


@torch.no_grad()
def load_peft_state_dict(model: AdapterModel, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-layout tensors into ``name`` (already added with the matching config).

    Raises:
        ValueError: listing every missing, unexpected or mis-shaped key at once; nothing is copied then.
    """
    params = model.adapter_parameters(name)
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen = set()
    expected = {k for k in params if k.endswith((".lora_A", ".lora_B"))}
    names, problems = _native_names(model.base, [k for k in state if k != "prompt_embeddings"], expected)
    for key, tensor in state.items():
        if key == "prompt_embeddings":
            prefix = model._methods.get("prefix")
            if prefix is None or name not in prefix.lengths:
                problems.append("unexpected prompt_embeddings: the adapter has no prefix part")
                continue
            module = prefix.bank.prefixes[name]
            if module.transform is not None:
                problems.append(
                    "prompt_embeddings is the projected (inference) form; add the adapter with projection=False"
                )
                continue
            target = module.embedding.weight
            seen.add("prompt_embeddings")
        elif key in names:
            target = params[names[key]]
            seen.add(names[key])
        else:
            continue  # reported by _native_names
        if tuple(target.shape) != tuple(tensor.shape):
            problems.append(
                f"{key}: shape {tuple(tensor.shape)} but the adapter expects {tuple(target.shape)}"
            )
            continue
        plan.append((target, tensor))
    if any(k.startswith("prefix.") for k in params):
        expected.add("prompt_embeddings")
    missing = sorted(expected - seen)
    if missing:
        problems.append(f"missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if problems:
        raise ValueError(f"cannot load tensors into adapter {name!r}: " + "; ".join(problems))
    for target, tensor in plan:
        target.copy_(tensor.to(target.dtype))
