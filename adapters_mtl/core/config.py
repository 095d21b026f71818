"""What every method shares: adapter names, the task head's config, and checks used by the methods'
own configs (each method's config lives beside it in ``adapters_mtl.methods``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "HeadConfig",
    "adapter_dtype_for",
    "hidden_size_of",
    "text_config",
    "as_tuple",
    "positive_number",
    "validate_name",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


def validate_name(name: object, what: str = "adapter name") -> str:
    """Check an adapter name: 1-64 chars of letters, digits, ``_`` or ``-``, starting alphanumeric.

    Names become module keys and, later, folder names, so dots, slashes and spaces are refused, and so
    are the names of torch's ModuleDict/ParameterDict attributes (``half``, ``to``, ``train``, ...), which
    torch cannot use as keys.

    Raises:
        ValueError: with the received value and the expected form.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid {what} {name!r}: expected 1-64 characters of letters, digits, '_' or '-', "
            "starting with a letter or digit (no dots, slashes or spaces), e.g. 'news_topic'."
        )
    if name in _TORCH_ATTRIBUTES:
        raise ValueError(
            f"invalid {what} {name!r}: it is the name of a torch module attribute (torch.nn.Module.{name}), "
            f"which cannot be a module key; pick another name, e.g. '{name}_task'."
        )
    return name


# names torch's ModuleDict and ParameterDict refuse as keys (they are attributes of the containers)
_TORCH_ATTRIBUTES = frozenset(dir(nn.ModuleDict)) | frozenset(dir(nn.ParameterDict))


def text_config(config: Any) -> Any:
    """The text part of a transformers config (a multimodal config's text model; else the config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def hidden_size_of(config: Any) -> int | None:
    """The hidden size of a transformers config (``hidden_size``, or GPT-2's ``n_embd``), or None."""
    cfg = text_config(config)
    return getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)


def adapter_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype LoRA weights are kept in by default: fp32 on a half-precision base (as PEFT's
    ``autocast_adapter_dtype``, so saved adapters round-trip bit-exact and train without fp16 underflow),
    else the base weight's dtype."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def as_tuple(value: Any) -> tuple | str | None:
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


def from_peft_modules(value: Any) -> Any:
    """A PEFT config's module names (a set or list; a regex str and None pass through) as a sorted
    tuple, the form native configs keep (PEFT turns lists into sets, so the order is not meaningful)."""
    return tuple(sorted(value)) if isinstance(value, (set, list)) else value


_HEAD_KINDS = ("seq_cls", "regression", "token_cls")
_POOLINGS = ("auto", "cls", "pooler", "mean", "last")
# how the pooled vector becomes logits; each reproduces a Hugging Face classification head exactly
_STYLES = ("linear", "roberta", "distilbert")


@dataclass(frozen=True)
class HeadConfig:
    """A task head carried by an adapter.

    Args:
        kind: ``"seq_cls"`` (one label per row), ``"regression"`` (``num_labels`` real values per row) or
            ``"token_cls"`` (one label per token).
        num_labels: output width.
        pooling: how a sequence becomes one vector: ``"cls"`` (first token), ``"pooler"`` (the base
            model's pooler, e.g. BERT), ``"mean"`` (mask-aware mean), ``"last"`` (last non-pad token,
            right or left padding); ``"auto"`` = pooler if the base has one, else last for decoders,
            else cls (always cls for the ``roberta`` and ``distilbert`` styles).
        dropout: dropout probability of the head (training only).
        label_names: optional names of the labels (stored with the adapter).
        style: the layers after pooling: ``"linear"`` (dropout → ``classifier``: BERT on its pooler output,
            token classification, and with ``bias=False`` a decoder's ``score``), ``"roberta"`` (dropout →
            ``dense`` (H, H) → tanh → dropout → ``classifier``: RoBERTa/XLM-R's classification head) or
            ``"distilbert"`` (``dense`` (H, H) → ReLU → dropout → ``classifier``: DistilBERT's
            ``pre_classifier``). Token classification is always ``"linear"``.
        bias: whether ``classifier`` has a bias (decoders' ``score`` layers have none).

    ``style`` and ``bias`` are left out of :meth:`to_dict` at their defaults, so the card of a plain
    linear head reads exactly as before they existed (older adapters_mtl versions still load it).
    """

    kind: str = "seq_cls"
    num_labels: int = 2
    pooling: str = "auto"
    dropout: float = 0.1
    label_names: tuple[str, ...] | None = None
    style: str = "linear"
    bias: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in _HEAD_KINDS:
            problems.append(f"kind must be one of {_HEAD_KINDS}, got {self.kind!r}")
        if not isinstance(self.num_labels, int) or self.num_labels <= 0:
            problems.append(f"num_labels must be a positive int, got {self.num_labels!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.pooling not in _POOLINGS:
            problems.append(f"pooling must be one of {_POOLINGS}, got {self.pooling!r}")
        if self.style not in _STYLES:
            problems.append(f"style must be one of {_STYLES}, got {self.style!r}")
        elif self.kind == "token_cls" and self.style != "linear":
            problems.append(f"a token_cls head is linear (one label per token), got style={self.style!r}")
        if not isinstance(self.bias, bool):
            problems.append(f"bias must be True or False, got {self.bias!r}")
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            problems.append(f"label_names has {len(self.label_names)} names but num_labels={self.num_labels}")
        if problems:
            raise ValueError("invalid HeadConfig: " + "; ".join(problems))
        object.__setattr__(self, "label_names", as_tuple(self.label_names))

    def to_dict(self) -> dict[str, Any]:
        """The card's ``head`` entry (``style`` and ``bias`` only when not their defaults)."""
        out = dataclasses.asdict(self)
        for key in ("style", "bias"):
            if out[key] == _HEAD_DEFAULTS[key]:
                del out[key]
        return out


_HEAD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(HeadConfig)}
