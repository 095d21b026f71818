"""LoRA adapters built from factors: the exact ``cat`` combination of weighted LoRA updates
(ΔW = Σ_i w_i·s_i·B_i·A_i = [w_1·s_1·B_1, …]·[A_1; …]) and attaching the result as a new LoRA adapter.

Shared by merging (``serving.merging``), LoraHub composition and training's stack folding, which is why
it lives beside LoRA rather than in either of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..core.config import HeadConfig
from .lora_config import LoraConfig


class AdapterModel(Protocol):
    """What this module uses of ``adapters_mtl.AdapterModel`` (a protocol: methods sit below the model,
    so they do not import it)."""

    heads: nn.ModuleDict

    def add_adapter(
        self, name: str, config: Any, head: HeadConfig | None = None, trainable: bool = True
    ) -> None: ...
    def remove_adapter(self, name: str) -> None: ...
    def factors(
        self, name: str, state: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]: ...


__all__ = ["LoraFactors", "add_cat", "add_factors", "cat_factors"]

# {module path: (A (r, in), B (out, r), scale)}
LoraFactors = Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]


def cat_factors(parts: Sequence[tuple[LoraFactors, float]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Concatenate weighted factors: ``{path: (A, B)}`` with scale 1 everywhere."""
    paths = list(dict.fromkeys(p for factors, _ in parts for p in factors))
    out = {}
    for path in paths:
        As, Bs = [], []
        for factors, weight in parts:
            if path in factors:
                A, B, scale = factors[path]
                As.append(A)
                Bs.append(B * (weight * scale))
        out[path] = (torch.cat(As, 0), torch.cat(Bs, 1))
    return out


def add_cat(
    model: AdapterModel,
    into: str,
    parts: Sequence[tuple[LoraFactors, float]],
    dropout: float = 0.0,
    head: HeadConfig | None = None,
    head_state: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """Add adapter ``into`` = the ``cat`` merge of ``parts`` (``[(factors, weight), ...]``)."""
    return add_factors(model, into, cat_factors(parts), dropout, head, head_state)


@torch.no_grad()
def add_factors(
    model: AdapterModel,
    into: str,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    dropout: float = 0.0,
    head: HeadConfig | None = None,
    head_state: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """Add LoRA adapter ``into`` with scale 1 and the given ``{path: (A, B)}`` (per-module ranks), and an
    optional head (a ``HeadConfig`` and its ``state_dict``). Nothing stays attached on error."""
    ranks = {p: a.shape[0] for p, (a, _) in factors.items()}
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
        live = model.factors(into)
        for path, (A, B) in factors.items():
            live[path][0].copy_(A)
            live[path][1].copy_(B)
        if head is not None:
            model.heads[into].load_state_dict(head_state or {})  # strict: no state is an error
    except Exception:
        model.remove_adapter(into)
        raise
    return into
