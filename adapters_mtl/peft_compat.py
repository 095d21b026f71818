"""Adapter tensors in PEFT's saved layout (the keys of PEFT's ``adapter_model.safetensors``).

PEFT's own ``get_peft_model_state_dict`` needs a ``PeftModel``; our layers are not PEFT's, so the key
mapping is written here (a few lines, no copy of PEFT code). Keys:
``base_model.model.<module path>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r) and, for
prefix tuning, ``prompt_embeddings`` (P, L·2·H·D).
"""

from __future__ import annotations

import torch

from .model import AdapterModel

__all__ = ["load_peft_state_dict", "to_peft_state_dict"]

_PEFT_PREFIX = "base_model.model."


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
    problems: list[str] = []
    seen = set()
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
        else:
            native = key.removeprefix(_PEFT_PREFIX).removesuffix(".weight")
            if native not in params:
                problems.append(f"unexpected key {key}")
                continue
            target = params[native]
            seen.add(native)
        if tuple(target.shape) != tuple(tensor.shape):
            problems.append(
                f"{key}: shape {tuple(tensor.shape)} but the adapter expects {tuple(target.shape)}"
            )
            continue
        plan.append((target, tensor))
    expected = {k for k in params if k.endswith((".lora_A", ".lora_B"))}
    if any(k.startswith("prefix.") for k in params):
        expected.add("prompt_embeddings")
    missing = sorted(expected - seen)
    if missing:
        problems.append(f"missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if problems:
        raise ValueError(f"cannot load tensors into adapter {name!r}: " + "; ".join(problems))
    for target, tensor in plan:
        target.copy_(tensor.to(target.dtype))
