"""(IA)³ as a method: per-row scaling vectors on targeted Linear/Conv1D layers, in PEFT's format.

Each targeted layer holds one vector per adapter: ``(out,)`` scaling the layer's output, or ``(in,)``
scaling its input on feed-forward layers (PEFT's ``feedforward_modules``). A mixed batch builds the
distinct adapters' vectors into a small table once per layer and indexes it per row: one multiply, no
per-adapter module call. Saved as PEFT saves it: ``base_model.model.<module path>.ia3_l`` of shape
``(out, 1)`` or ``(1, in)`` (written here: PEFT's state-dict helper needs a ``PeftModel``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn
from typing_extensions import override

from ..core.module_paths import PEFT_PREFIX
from ..core.quantize import compute_dtype, linear_features, refuse_merge
from ..core.routing import MixedRows, Route
from .base import KeyMap
from .ia3_config import IA3Config
from .wrapped import MergingLayerMethod, innermost, match_saved_keys, target_paths

__all__ = ["IA3Layer", "IA3Method"]

IA3Selection = int | MixedRows | tuple[int | MixedRows, ...]


class IA3Layer(nn.Module):
    """Wraps one layer (the outermost module at the target's path); scales each row by its adapter's
    vector. ``feedforward``: scale the input (``base(x·l)``), else the output (``base(x)·l``)."""

    _route: Route

    def __init__(
        self, base_layer: nn.Module, route: Route, feedforward: bool, dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        inner = innermost(base_layer)
        self.conv1d = not isinstance(inner, nn.Linear)  # transformers' Conv1D stores (in, out)
        in_f, out_f = linear_features(inner)  # from the module: a quantized weight may be packed
        self.feedforward = feedforward
        self.dim = in_f if feedforward else out_f
        w_dtype = compute_dtype(inner)  # a quantized base: its compute dtype, never int8/uint8
        self.dtype = dtype or (torch.float32 if w_dtype in (torch.float16, torch.bfloat16) else w_dtype)
        self.ia3_l = nn.ParameterDict()  # name -> (dim,)
        self.name_of_slot: dict[int, str] = {}
        self.merged: str | None = None
        self._original: list[
            tuple[torch.Tensor, torch.Tensor | None]
        ] = []  # (weight, bias) set aside by merge
        object.__setattr__(self, "_route", route)  # shared, not a submodule

    def add(self, name: str, slot: int, init: str) -> None:
        w = cast(torch.Tensor, innermost(self.base_layer).weight)
        vec = torch.ones(self.dim, dtype=self.dtype, device=w.device)
        if init == "random":
            vec = vec + 0.1 * torch.randn(self.dim, dtype=self.dtype, device=w.device)
        self.ia3_l[name] = nn.Parameter(vec)
        self.name_of_slot[slot] = name

    def remove(self, name: str) -> None:
        del self.ia3_l[name]
        self.name_of_slot = {s: n for s, n in self.name_of_slot.items() if n != name}

    def _scale(
        self, sel: int | MixedRows, batch: int, ndim: int, device: torch.device
    ) -> torch.Tensor | None:
        """One routing level's scaling, broadcastable against (B, ..., dim); None when it is the identity."""
        if isinstance(sel, int):
            name = self.name_of_slot.get(sel)
            return None if name is None or name == self.merged else self.ia3_l[name]
        if self.merged is not None:
            raise RuntimeError(
                f"adapter {self.merged!r} is merged into this layer; unmerge() before mixing rows"
            )
        rows = sel.for_batch(batch)
        names = [self.name_of_slot.get(s) for s in rows.uniq]
        # rows without an IA3 adapter here get the identity (allocated only when there are such rows)
        ones = torch.ones(self.dim, dtype=self.dtype, device=device) if None in names else None
        table = torch.stack([self.ia3_l[n] if n is not None else cast(torch.Tensor, ones) for n in names])
        return table.index_select(0, rows.inv).view(batch, *([1] * (ndim - 2)), self.dim)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer with each row's vectors applied (a stack's levels multiply)."""
        if not self.name_of_slot:
            return self.base_layer(x, *args, **kwargs)
        sel: IA3Selection = self._route.get("ia3")
        scale: torch.Tensor | None = None
        for level in sel if isinstance(sel, tuple) else (sel,):
            s = self._scale(level, x.shape[0], x.dim(), x.device)
            if s is not None:
                scale = s if scale is None else scale * s
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.feedforward:  # as PEFT: the input in the vectors' dtype, then back
            return self.base_layer((x.to(self.dtype) * scale).to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out * scale).to(out.dtype)

    @torch.no_grad()
    def merge(self, name: str, keep_original: bool = True) -> None:
        """Fold ``name`` into the base weight (rows scaled for outputs, columns for feed-forward inputs, and
        the bias of an output-scaled layer). ``keep_original``: ``unmerge`` restores the exact tensors."""
        inner = innermost(self.base_layer)
        # a quantized weight: a clear error before anything changes
        refuse_merge([("this layer", inner)], name)
        w, b = cast(torch.Tensor, inner.weight), cast("torch.Tensor | None", inner.bias)
        vec = self.ia3_l[name].to(w.dtype)
        # Linear (out, in) / Conv1D (in, out): the vector runs along the out or in axis
        along_rows = (not self.feedforward) != self.conv1d
        factor = vec[:, None] if along_rows else vec[None, :]
        if keep_original:
            self._original = [(w, b)]
            inner.weight = nn.Parameter(w * factor, requires_grad=False)
            if b is not None and not self.feedforward:
                inner.bias = nn.Parameter(b * vec, requires_grad=False)
        else:
            w.mul_(factor)
            if b is not None and not self.feedforward:
                b.mul_(vec)
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight (bit-exact with ``keep_original``; else divided back, as PEFT)."""
        if self.merged is None:
            return
        inner = innermost(self.base_layer)
        if self._original:
            (w, b), self._original = self._original[0], []
            inner.weight = cast(nn.Parameter, w)
            if b is not None:
                inner.bias = cast(nn.Parameter, b)
        else:
            w = cast(torch.Tensor, inner.weight)
            vec = self.ia3_l[self.merged].to(w.dtype)
            along_rows = (not self.feedforward) != self.conv1d
            w.div_(vec[:, None] if along_rows else vec[None, :])
            if inner.bias is not None and not self.feedforward:
                cast(torch.Tensor, inner.bias).div_(vec)
        self.merged = None

    def extra_repr(self) -> str:
        side = "input" if self.feedforward else "output"
        return f"scales={side} ({self.dim}), adapters={list(self.ia3_l)}, merged={self.merged}"


class IA3Method(MergingLayerMethod):
    """Owns every :class:`IA3Layer` of one model. Selection: an int slot (every row), :class:`MixedRows`,
    or a tuple of those (a stack: the levels' vectors multiply)."""

    name = "ia3"
    config_class = IA3Config
    peft_config_types = ("IA3Config",)

    def __init__(self, model: nn.Module, route: Route, *, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(model, route, adapter_dtype=adapter_dtype)
        self.layers: dict[str, IA3Layer] = {}
        self.resolved: dict[
            str, tuple[list[str] | str, list[str] | str]
        ] = {}  # name -> (targets, feed-forward targets)

    # ---------------------------------------------------------------- targets
    def _resolve(self, config: IA3Config) -> tuple[Any, Any]:
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        )
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        targets: Any = config.targets
        feedforward: Any = config.feedforward
        if targets is None:
            targets = TARGETS.get(model_type) if model_type else None
            if targets is None:
                raise ValueError(
                    f"IA3Config.targets is None and PEFT has no default for model type {model_type!r}: pass "
                    "targets=(...) with module-name suffixes such as ('k_proj', 'v_proj', 'down_proj')."
                )
        if feedforward is None:
            feedforward = FEEDFORWARD.get(model_type, []) if config.targets is None and model_type else []
        return targets, feedforward

    def _match(self, config: IA3Config) -> list[tuple[str, bool]]:
        """(target path, feed-forward?) of every layer the config targets, as PEFT matches them."""
        from peft.tuners.tuners_utils import check_target_module_exists

        targets, feedforward = self._resolve(config)
        peft_cfg = config.to_peft(target_modules=targets, feedforward_modules=feedforward)
        paths = [
            (name, _is_feedforward(peft_cfg.feedforward_modules, name))
            for name in target_paths(
                self.model, lambda n: bool(check_target_module_exists(peft_cfg, n)), IA3Layer
            )
        ]
        if not paths:
            wanted = [targets] if isinstance(targets, str) else list(targets)
            raise ValueError(
                f"IA3 targets {wanted} match no Linear/Conv1D module of {type(self.model).__name__}"
            )
        return paths

    def _wrap(self, path: str, feedforward: bool) -> IA3Layer:
        layer = self.layers.get(path)
        if layer is not None:
            if layer.feedforward != feedforward:
                raise ValueError(
                    f"{path} already scales its {'input' if layer.feedforward else 'output'} for another IA3 "
                    "adapter; every IA3 adapter on a model must agree on which targets are feed-forward"
                )
            return layer
        return self.wrap(path, lambda m: IA3Layer(m, self.route, feedforward, self.adapter_dtype))

    # ---------------------------------------------------------------- adapters
    @override
    def add(self, name: str, config: IA3Config) -> None:
        matched = self._match(config)
        for path, ff in matched:  # check every layer before attaching to any
            if path in self.layers and self.layers[path].feedforward != ff:
                self._wrap(path, ff)  # raises the explanation
        slot = self.next_slot()
        for path, ff in matched:
            self._wrap(path, ff).add(name, slot, config.init)
        self.slot[name], self.paths[name] = slot, [p for p, _ in matched]
        targets, feedforward = self._resolve(config)
        self.resolved[name] = (
            [p for p, _ in matched] if not isinstance(targets, str) else targets,
            [p for p, ff in matched if ff] if not isinstance(feedforward, str) else feedforward,
        )

    @override
    def remove(self, name: str) -> None:
        for path in self.paths.pop(name):
            self.layers[path].remove(name)
        del self.slot[name], self.resolved[name]

    @override
    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """``{"<module path>.ia3_l": vector}`` for every targeted module."""
        return {f"{p}.ia3_l": cast(nn.Parameter, self.layers[p].ia3_l[name]) for p in self.paths[name]}

    @override
    def owns_parameter(self, qualified_name: str, parameter: nn.Parameter) -> bool:
        return ".ia3_l." in qualified_name

    # ---------------------------------------------------------------- files
    @override
    @classmethod
    def owns_peft_key(cls, key: str) -> bool:
        return key.endswith(".ia3_l")

    @override
    @classmethod
    def check_peft_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        return [
            f"unexpected key {k!r} of shape {tuple(t.shape)} (expected <module>.ia3_l of shape (out, 1) or (1, in))"
            for k, t in tensors.items()
            if not k.endswith(".ia3_l") or t.dim() != 2 or 1 not in t.shape
        ]

    @override
    def peft_config(self, name: str, config: IA3Config, *, task_type: str, base_model: str | None) -> Any:
        targets, feedforward = self.resolved[name]
        peft_cfg = config.to_peft(
            target_modules=targets,
            feedforward_modules=feedforward,
            task_type=task_type,
            base_model_name_or_path=base_model,
        )
        peft_cfg.init_ia3_weights = True  # the file holds the values; PEFT's init choice is irrelevant
        if any(self.layers[p].conv1d for p in self.paths[name]):
            peft_cfg.fan_in_fan_out = True  # what PEFT sets for transformers' Conv1D layers
        return peft_cfg

    @override
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for path in self.paths[name]:
            layer = self.layers[path]
            vec = layer.ia3_l[name].detach()
            out[f"{PEFT_PREFIX}{path}.ia3_l"] = (
                (vec[None, :] if layer.feedforward else vec[:, None]).contiguous().clone()
            )
        return out

    @override
    @torch.no_grad()
    def load_peft_state(self, name: str, state: Mapping[str, torch.Tensor], key_maps: KeyMap) -> list[str]:
        mine = {p: self.layers[p].ia3_l[name] for p in self.paths[name]}
        best = match_saved_keys(
            state, mine, key_maps, lambda k, fn: fn(k.removeprefix(PEFT_PREFIX).removesuffix(".ia3_l"))
        )
        problems = [f"unexpected key {k}" for k in state if k not in best][:8]
        missing = sorted(set(mine) - set(best.values()))
        if missing:
            problems.append(f"missing keys: {[f'{p}.ia3_l' for p in missing[:8]]}")
        plan = []
        for key, path in best.items():
            target, tensor = mine[path], state[key]
            if tensor.numel() != target.numel():
                problems.append(
                    f"{key}: shape {tuple(tensor.shape)} but the adapter expects {target.numel()} values"
                )
            else:
                plan.append((target, tensor))
        if not problems:
            for target, tensor in plan:
                target.copy_(tensor.reshape(-1).to(target.dtype))
        return problems


def _is_feedforward(feedforward: Any, path: str) -> bool:
    """PEFT's rule: a regex must match the whole path; a list of names matches by suffix."""
    if isinstance(feedforward, str):
        return bool(re.fullmatch(feedforward, path))
    return any(path.endswith(name) for name in feedforward or ())
