"""Task heads carried by adapters: each row of a mixed batch goes through its own adapter's head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import HeadConfig

__all__ = ["Head", "HeadOutput", "pool"]


def pool(
    hidden: torch.Tensor, mask: torch.Tensor | None, how: str, pooled: torch.Tensor | None
) -> torch.Tensor:
    """One vector per row from (R, T, H) hidden states.

    Args:
        hidden: (R, T, H).
        mask: (R, T) 1 for real tokens, or None (all real).
        how: ``cls`` | ``pooler`` | ``mean`` | ``last`` (last real token; works for left and right padding).
        pooled: (R, H) the base model's pooler output, needed for ``pooler``.
    """
    if how == "pooler":
        if pooled is None:
            raise ValueError(
                "pooling='pooler' but the base model has no pooler output; use 'cls', 'mean' or 'last'"
            )
        return pooled
    if how == "cls":
        return hidden[:, 0]
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    m = mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    # last real token: the highest index with mask 1
    T = hidden.shape[1]
    last = (T - 1) - torch.flip(mask.long(), dims=[1]).argmax(dim=1)  # (R,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Head(nn.Module):
    """Dropout + linear on pooled (sequence tasks) or per-token (token tasks) hidden states."""

    def __init__(self, config: HeadConfig, hidden_size: int, pooling: str) -> None:
        super().__init__()
        self.config, self.pooling = config, pooling
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(hidden_size, config.num_labels)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, pooled: torch.Tensor | None
    ) -> torch.Tensor:
        """(R, T, H) → (R, K) for sequence heads, (R, T, K) for token classification."""
        if self.config.kind == "token_cls":
            return self.classifier(self.dropout(hidden))
        return self.classifier(self.dropout(pool(hidden, mask, self.pooling, pooled)))


@dataclass
class HeadOutput:
    """One adapter's head applied to its rows: ``rows`` (R,) batch indices, ``logits`` (R, K) or (R, T, K)."""

    rows: torch.Tensor
    logits: torch.Tensor
