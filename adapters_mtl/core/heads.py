"""Task heads carried by adapters: each row of a mixed batch goes through its own adapter's head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import HeadConfig

__all__ = ["Head", "HeadOutput", "head_shapes", "pool"]


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
    """A classification head on pooled (sequence tasks) or per-token (token tasks) hidden states.

    The ``style`` of its config picks the layers, each as in Hugging Face's task models (so a PEFT
    classifier imported into this head gives the same logits):

    - ``linear``: dropout → ``classifier`` (BertForSequenceClassification on the pooler output, every
      ``*ForTokenClassification``, and a decoder's bias-free ``score`` on the last real token);
    - ``roberta``: dropout → ``dense`` → tanh → dropout → ``classifier`` (RobertaClassificationHead);
    - ``distilbert``: ``dense`` → ReLU → dropout → ``classifier`` (DistilBERT's pre_classifier).

    Parameters (the names in ``head.safetensors``): ``classifier.weight`` (K, H), ``classifier.bias`` (K,)
    unless ``bias=False``, and for the two-layer styles ``dense.weight`` (H, H), ``dense.bias`` (H,).
    """

    def __init__(self, config: HeadConfig, hidden_size: int, pooling: str) -> None:
        super().__init__()
        self.config, self.pooling = config, pooling
        self.dropout = nn.Dropout(config.dropout)
        if config.style != "linear":
            self.dense = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, config.num_labels, bias=config.bias)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, pooled: torch.Tensor | None
    ) -> torch.Tensor:
        """(R, T, H) → (R, K) for sequence heads, (R, T, K) for token classification."""
        if self.config.kind == "token_cls":
            return self.classifier(self.dropout(hidden))
        x = pool(hidden, mask, self.pooling, pooled)  # (R, H)
        if self.config.style == "roberta":
            x = torch.tanh(self.dense(self.dropout(x)))
        elif self.config.style == "distilbert":
            x = torch.relu(self.dense(x))
        return self.classifier(self.dropout(x))


def head_shapes(config: HeadConfig, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes of a :class:`Head` (what ``head.safetensors`` must hold)."""
    K, H = config.num_labels, hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    if config.style != "linear":
        shapes.update({"dense.weight": (H, H), "dense.bias": (H,)})
    shapes["classifier.weight"] = (K, H)
    if config.bias:
        shapes["classifier.bias"] = (K,)
    return shapes


@dataclass
class HeadOutput:
    """One adapter's head applied to its rows: ``rows`` (R,) batch indices, ``logits`` (R, K) or (R, T, K)."""

    rows: torch.Tensor
    logits: torch.Tensor
