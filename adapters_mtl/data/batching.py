"""Padding token features into a batch, shared by training (right padding) and generation (left)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["pad"]


def pad(tokenizer: PreTrainedTokenizerBase, features: list[dict], side: str) -> dict[str, torch.Tensor]:
    """``tokenizer.pad`` on ``side`` (right for training, left for generation); the tokenizer's own
    setting is restored."""
    saved, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        return dict(tokenizer.pad(features, return_tensors="pt"))
    finally:
        tokenizer.padding_side = saved
