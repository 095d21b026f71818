"""Merging LoRA adapters in ΔW space.

``cat`` is exact: ΔW = Σ_i w_i·s_i·B_i·A_i = [w_1·s_1·B_1, …]·[A_1; …], one adapter whose rank is the sum
of the ranks and whose scale is 1. It is what a stack ("shared", "news") computes, so a trained stack can be
published as one self-contained adapter that PEFT loads. (PEFT's ``add_weighted_adapter(combination_type=
"cat")`` does the same on a PeftModel; ours works on per-layer tensors, so it also folds snapshots taken
during training, and it keeps per-module ranks and rsLoRA scales exact.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .config import LoraConfig

__all__ = ["LoraFactors", "add_cat", "cat_factors", "lora_factors", "merge_adapters"]

# {module path: (A (r, in), B (out, r), scale)}
LoraFactors = Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]


def lora_factors(model, name: str, tensors: Mapping[str, torch.Tensor] | None = None) -> dict:
    """The LoRA factors of adapter ``name``: ``{path: (A, B, scale)}``.

    ``tensors`` (keys as in ``model.adapter_parameters(name)``) replaces the live values, e.g. a snapshot.
    """
    lora = model._methods.get("lora")
    if lora is None or name not in lora.targets:
        raise ValueError(f"adapter {name!r} has no LoRA part (methods: {model._method_names(name)})")
    out = {}
    for path in lora.targets[name]:
        layer = lora.layers[path]
        A = tensors[f"{path}.lora_A"] if tensors is not None else layer.lora_A[name]
        B = tensors[f"{path}.lora_B"] if tensors is not None else layer.lora_B[name]
        out[path] = (A.detach(), B.detach(), float(layer.scaling[name]))
    return out


def cat_factors(parts: Sequence[tuple[LoraFactors, float]]) -> tuple[dict, dict[str, int]]:
    """Concatenate weighted factors: returns ``({path: (A, B)}, {path: rank})`` with scale 1 everywhere."""
    paths = list(dict.fromkeys(p for factors, _ in parts for p in factors))
    out, ranks = {}, {}
    for path in paths:
        As, Bs = [], []
        for factors, weight in parts:
            if path in factors:
                A, B, scale = factors[path]
                As.append(A)
                Bs.append(B * (weight * scale))
        out[path] = (torch.cat(As, 0), torch.cat(Bs, 1))
        ranks[path] = out[path][0].shape[0]
    return out, ranks


def merge_adapters(
    model,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    method: str = "cat",
    into: str = "merged",
    head: str | None = "last",
) -> str:
    """Merge the LoRA adapters ``names`` into a new adapter ``into`` of ``model``.

    Args:
        names: adapters to merge (LoRA only).
        weights: one weight per adapter (default 1 each).
        method: ``cat`` (exact ΔW = Σ w_i·ΔW_i, rank Σ r_i).
        into: the new adapter's name.
        head: ``"last"`` copies the head of the last adapter that has one, a name copies that adapter's
            head, ``None`` adds no head.

    Raises:
        ValueError / KeyError: unknown or non-LoRA adapters, wrong number of weights, unknown method;
            the model is unchanged on error.
    """
    names = list(names)
    model._check_known(names)
    if not names:
        raise ValueError("merge_adapters needs at least one adapter name")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(
            f"got {len(weights)} weights for {len(names)} adapters {names}: pass one per adapter"
        )
    if method != "cat":
        raise ValueError(f"unknown merge method {method!r}; expected 'cat'")
    not_lora = [n for n in names if model._method_names(n) != ["lora"]]
    if not_lora:
        raise ValueError(
            f"only LoRA adapters can be merged; {not_lora} have methods "
            f"{[model._method_names(n) for n in not_lora]}"
        )
    source = next((n for n in reversed(names) if n in model.heads), None) if head == "last" else head
    if source is not None and source not in model.heads:
        raise ValueError(f"head={head!r}: adapter {source!r} has no head; heads: {sorted(model.heads)}")
    parts = [(lora_factors(model, n), w) for n, w in zip(names, weights, strict=True)]
    dropout = max(c.dropout for n in names for c in model.adapter_config(n))
    head_cfg = model.head_config(source) if source else None
    head_state = model.heads[source].state_dict() if source else None
    add_cat(model, into, parts, dropout=dropout, head=head_cfg, head_state=head_state)
    return into


@torch.no_grad()
def add_cat(model, into: str, parts, dropout: float = 0.0, head=None, head_state=None) -> str:
    """Add adapter ``into`` = the ``cat`` merge of ``parts`` (``[(factors, weight), ...]``), with an
    optional head (a ``HeadConfig`` and its ``state_dict``)."""
    factors, ranks = cat_factors(parts)
    r = max(ranks.values())
    config = LoraConfig(
        r=r,
        alpha=r,
        targets=tuple(factors),
        dropout=dropout,
        rank_pattern={p: k for p, k in ranks.items() if k != r},
        alpha_pattern={p: k for p, k in ranks.items() if k != r},
        init="zeros",
    )
    model.add_adapter(into, config, head=head)
    try:
        lora = model._methods["lora"]
        for path, (A, B) in factors.items():
            layer = lora.layers[path]
            layer.lora_A[into].copy_(A)
            layer.lora_B[into].copy_(B)
        if head is not None:
            model.heads[into].load_state_dict(head_state)
    except Exception:
        model.remove_adapter(into)
        raise
    return into
