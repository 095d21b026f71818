"""Quantized bases: the frozen model's Linear weights in int8 or 4 bits (QLoRA), adapters in fp32/bf16.

The quantization is bitsandbytes' (what PEFT's and transformers' QLoRA use): ``Linear8bitLt`` (LLM.int8
weights, one scale per output row) and ``Linear4bit`` (NF4 or FP4 blocks of 64 with an absmax each).
Both are ``nn.Linear`` subclasses whose forward and backward to the input run on CPU (checked with
bitsandbytes 0.50.2) and CUDA, so every adapter method wraps them as it wraps a plain Linear; what differs is read
through the helpers below: the features come from the module (a 4-bit weight is packed into an
``(n, 1)`` uint8 tensor), the adapters' dtype from the layer's compute dtype (never int8/uint8), and the
dense weight (DoRA's norm) from PEFT's ``dequantize_bnb_weight``. Merging into a quantized weight is
refused (:func:`refuse_merge`): re-quantizing ``W + ΔW`` would lose most of a small ``ΔW``.

torchao was tried too (0.18 on torch 2.13 CPU): its int8 weight-only tensors work, but
``Int4WeightOnlyConfig`` leaves a CPU Linear unquantized without a word, so one library covers both here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TypeVar, cast

import torch
from torch import nn

__all__ = [
    "QUANTIZE_CHOICES",
    "QuantizedMergeError",
    "check_quantize",
    "compute_dtype",
    "dense_weight",
    "is_quantized",
    "linear_features",
    "quantize_base",
    "refuse_merge",
]

# the values of ``quantize`` (a recipe's ``base.quantize``, ``load_base(quantize=...)``); None = "none"
QUANTIZE_CHOICES = ("none", "int8", "nf4", "fp4")
_PIP = "pip install 'bitsandbytes>=0.50,<0.51'"
M = TypeVar("M", bound=nn.Module)


class QuantizedMergeError(ValueError):
    """An adapter cannot be folded into a quantized base weight."""


def check_quantize(value: object) -> str | None:
    """Validate a ``quantize`` option.

    Args:
        value: None, or one of :data:`QUANTIZE_CHOICES`.

    Returns:
        The kind (``"int8"``, ``"nf4"`` or ``"fp4"``), or None for no quantization (None or ``"none"``).

    Raises:
        ValueError: any other value; the message lists the allowed ones.
    """
    if value is None or value == "none":
        return None
    if not isinstance(value, str) or value not in QUANTIZE_CHOICES:
        raise ValueError(
            f"quantize={value!r}: expected one of {', '.join(map(repr, QUANTIZE_CHOICES))} "
            "('int8': LLM.int8 weights; 'nf4'/'fp4': 4-bit weights, QLoRA's NF4 by default)"
        )
    return value


def _bnb_weight(w: object) -> bool:
    return type(w).__module__.split(".")[0] == "bitsandbytes"


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer``'s weight is quantized: a bitsandbytes or torchao tensor, or any integer weight."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor):
        return False
    return not w.is_floating_point() or type(w).__module__.split(".")[0] in ("bitsandbytes", "torchao")


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a Linear (read from the module: a quantized weight may be packed) or a Conv1D
    (transformers' GPT-2 layer, whose weight is stored ``(in, out)``)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    w = cast(torch.Tensor, layer.weight)
    return int(w.shape[0]), int(w.shape[1])


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The floating dtype ``layer`` computes in: its weight's, or for a quantized weight the layer's
    ``compute_dtype`` (bitsandbytes 4-bit), else float32 (what an adapter is kept in by default)."""
    w = cast(torch.Tensor, layer.weight)
    if not is_quantized(layer):
        return w.dtype
    dtype = getattr(layer, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return w.dtype if w.is_floating_point() else torch.float32  # torchao tensors report their float dtype


def dense_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight as a dense float tensor in its stored layout ((out, in) for a Linear).

    A quantized weight is dequantized (bitsandbytes through PEFT's ``dequantize_bnb_weight``, torchao
    through the tensor's ``dequantize()``), detached; a plain weight is returned as is, cast to ``dtype``
    if given (gradients still reach it).
    """
    w = cast(torch.Tensor, layer.weight)
    if _bnb_weight(w):
        from peft.utils.integrations import dequantize_bnb_weight

        # an 8-bit layer keeps the row scales in its state once it has run (PEFT reads them there too)
        dense = dequantize_bnb_weight(cast(nn.Parameter, w), state=getattr(layer, "state", None))
    elif is_quantized(layer) and hasattr(w, "dequantize"):
        dense = w.dequantize()
    else:
        return w if dtype is None else w.to(dtype)
    dense = dense.detach()
    return dense if dtype is None else dense.to(dtype)


def refuse_merge(layers: Iterable[tuple[str, nn.Module]], name: str) -> None:
    """Raise before anything is merged when some layer of ``layers`` ((path, base layer) pairs) is quantized.

    Raises:
        QuantizedMergeError: naming the quantized layers and what to do instead.
    """
    bad = [path for path, layer in layers if is_quantized(layer)]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise QuantizedMergeError(
            f"cannot merge adapter {name!r}: the base layers it targets are quantized ({shown}), and "
            "W + ΔW re-quantized would lose most of ΔW. Serve it unmerged (routing works on a quantized "
            "base), or load the base unquantized (quantize='none') and merge there."
        )


class _DropInt8CastNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_note() -> None:
    """Silence bitsandbytes' note that an int8 layer casts fp32/bf16 inputs to fp16 before quantizing them:
    it is logged on every forward in eval mode (LLM.int8 always does this), so once per layer per call."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNote) for f in log.filters):
        log.addFilter(_DropInt8CastNote())


def _skipped(model: nn.Module) -> set[str]:
    """Module paths kept in full precision: task heads and output embeddings (transformers' rule)."""
    from transformers import PreTrainedModel
    from transformers.quantizers.base import get_keys_to_not_convert

    if isinstance(model, PreTrainedModel):
        keys = get_keys_to_not_convert(model)  # parameter or module names
    else:
        keys = [name for name, _ in list(model.named_parameters())[-1:]]
    return {k.removesuffix(".weight").removesuffix(".bias") for k in keys}


def quantize_base(
    model: M,
    kind: str | None,
    *,
    skip: Iterable[str] | None = None,
    compute: torch.dtype | None = None,
) -> M:
    """Replace ``model``'s Linear (and Conv1D) layers by bitsandbytes' quantized ones, in place.

    The task head and the output embeddings stay in full precision (transformers' ``BitsAndBytesConfig``
    rule: tied weights, the last module and ``get_output_embeddings()``). Each new layer is frozen and
    computes in ``compute`` (default: the original weight's dtype, so a bf16 base stays bf16).

    Args:
        model: the base, before an :class:`~adapters_mtl.AdapterModel` wraps it.
        kind: ``"int8"``, ``"nf4"``, ``"fp4"``, or None/``"none"`` (returns ``model`` unchanged).
        skip: module paths (or suffixes) to keep in full precision, instead of the default ones.
        compute: the 4-bit layers' compute dtype.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: an unknown ``kind``. ImportError: bitsandbytes is not installed (the message says how).
    """
    kind = check_quantize(kind)
    if kind is None:
        return model
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"quantize={kind!r} needs bitsandbytes: {_PIP}") from e
    from transformers.pytorch_utils import Conv1D

    if kind == "int8":
        _quiet_int8_cast_note()
    keep = _skipped(model) if skip is None else set(skip)
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear and not isinstance(module, Conv1D):
            continue
        if any(path == k or path.endswith(f".{k}") for k in keep):
            continue
        w = module.weight.detach()
        in_f, out_f = linear_features(module)
        w = w.T.contiguous() if isinstance(module, Conv1D) else w  # (out, in) as nn.Linear
        bias = cast("torch.Tensor | None", module.bias)
        q: nn.Module
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(in_f, out_f, bias is not None, has_fp16_weights=False, device="meta")
            q.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            dtype = compute or w.dtype
            q = bnb.nn.Linear4bit(in_f, out_f, bias is not None, dtype, quant_type=kind, device="meta")
            q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=kind)
            # bitsandbytes repacks a 4-bit weight in place on its first CPU eval forward where AVX512-BF16
            # exists: the frozen base must stay byte-identical (and dequantizable by PEFT's helper)
            q.support_avx512bf16_for_cpu = False
        if bias is not None:
            q.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        q = q.to(w.device)  # quantizes (bitsandbytes quantizes on the first move to a real device)
        model.set_submodule(path, q)
    return model
