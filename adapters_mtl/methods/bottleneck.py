"""Bottleneck adapters as a method (Houlsby / Pfeiffer placement), routed per row.

Each targeted output projection (a sub-layer's last Linear/Conv1D: BERT's ``attention.output.dense`` and
``output.dense``, Llama's ``o_proj`` and ``down_proj``, GPT-2's ``c_proj``) is wrapped by a
:class:`BottleneckLayer` that adds ``scaling · up(act(down(LN(h))))`` to the projection's output ``h``.
The sub-layer's own dropout, residual and layer norm follow unchanged.

Routing: one adapter for every row is two plain ``linear`` calls. A mixed batch builds the distinct
adapters' weights into small tables once per layer (zero rows for "no adapter": an all-zero adapter adds
exactly 0), gathers each row's matrices and runs two batched matmuls — the same gather-and-bmm idea as
LoRA's routed path, never one module call per adapter. Adapters of different widths share a table
(zero-padded: the padded units are 0 before and after the non-linearity, which maps 0 to 0); adapters of
different non-linearities go in one table each.

Written by hand: PEFT has no bottleneck method and AdapterHub's ``adapters`` (the reference
implementation) requires transformers 4.x, so it cannot run beside transformers 5 here; the tests check the
formula directly. Saved in adapters_mtl's format (config JSON + safetensors, see
``Method.has_peft_format``) under ``base_model.model.<module path>.bottleneck.<down|up|norm>.<weight|bias>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from ..core.config import adapter_dtype_for
from ..core.module_paths import PEFT_PREFIX
from ..core.quantize import compute_dtype, linear_features
from ..core.routing import MixedRows, Route
from .base import KeyMap
from .bottleneck_config import BottleneckConfig
from .wrapped import LayerMethod, innermost, match_saved_keys, target_paths

__all__ = ["BottleneckLayer", "BottleneckMethod"]

BottleneckSelection = int | MixedRows | tuple[int | MixedRows, ...]

# Output projections of the attention and feed-forward sub-layers (regexes over the full module name),
# by model type: (attention output, feed-forward output).
_BERT = (r".*attention\.output\.dense", r".*layer\.\d+\.output\.dense")
_LLAMA = (r".*self_attn\.o_proj", r".*mlp\.down_proj")
OUTPUT_PROJECTIONS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert", "mpnet"), _BERT),
    "distilbert": (r".*attention\.out_lin", r".*ffn\.lin2"),
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "phi3"),
        _LLAMA,
    ),
    "gpt2": (r".*attn\.c_proj", r".*mlp\.c_proj"),
    "gpt_neox": (r".*attention\.dense", r".*mlp\.dense_4h_to_h"),
}
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}  # each maps 0 to 0
PARTS = ("down.weight", "down.bias", "up.weight", "up.bias", "norm.weight", "norm.bias")
NORM_EPS = 1e-5


def _matches(targets: tuple[str, ...] | str, path: str) -> bool:
    """PEFT's target matching: a regex must match the whole name, a name matches a suffix at a dot."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith(f".{t}") for t in targets)


class BottleneckLayer(nn.Module):
    """Wraps one output projection (the outermost module at its path) and adds each row's adapter."""

    _route: Route

    def __init__(self, base_layer: nn.Module, route: Route, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.base_layer = base_layer
        # the output width, from the module (a quantized weight may be packed); dtype never int8/uint8
        self.features = linear_features(innermost(base_layer))[1]
        self.dtype = dtype or adapter_dtype_for(compute_dtype(innermost(base_layer)))
        # name -> tensor; ParameterDicts so that each adapter's tensors are ordinary parameters
        self.bn_down_weight = nn.ParameterDict()  # (width, features)
        self.bn_down_bias = nn.ParameterDict()  # (width,)
        self.bn_up_weight = nn.ParameterDict()  # (features, width)
        self.bn_up_bias = nn.ParameterDict()  # (features,)
        self.bn_norm_weight = nn.ParameterDict()  # (features,), only with layer_norm
        self.bn_norm_bias = nn.ParameterDict()
        self.config: dict[str, BottleneckConfig] = {}
        self.name_of_slot: dict[int, str] = {}
        # inference tables of a mixed batch: (names, device, tensor versions) -> stacked tensors
        self._table_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        object.__setattr__(self, "_route", route)  # shared, not a submodule

    def _dicts(self) -> dict[str, nn.ParameterDict]:
        return {
            "down.weight": self.bn_down_weight,
            "down.bias": self.bn_down_bias,
            "up.weight": self.bn_up_weight,
            "up.bias": self.bn_up_bias,
            "norm.weight": self.bn_norm_weight,
            "norm.bias": self.bn_norm_bias,
        }

    def add(self, name: str, slot: int, config: BottleneckConfig) -> None:
        d, r = self.features, config.width(self.features)
        device = cast(torch.Tensor, innermost(self.base_layer).weight).device
        kw: dict[str, Any] = {"dtype": self.dtype, "device": device}
        down = torch.randn(r, d, **kw) * 0.01
        up = torch.zeros(d, r, **kw) if config.init == "near_identity" else torch.randn(d, r, **kw) / r**0.5
        values = {"down.weight": down, "down.bias": torch.zeros(r, **kw), "up.weight": up}
        values["up.bias"] = (
            torch.zeros(d, **kw) if config.init == "near_identity" else 0.1 * torch.randn(d, **kw)
        )
        if config.init == "random":
            values["down.weight"] = torch.randn(r, d, **kw) / d**0.5
        if config.layer_norm:
            values["norm.weight"] = torch.ones(d, **kw)
            values["norm.bias"] = torch.zeros(d, **kw)
            if config.init == "random":
                values["norm.weight"] = values["norm.weight"] + 0.1 * torch.randn(d, **kw)
        dicts = self._dicts()
        for part, value in values.items():
            dicts[part][name] = nn.Parameter(value)
        self.config[name] = config
        self.name_of_slot[slot] = name

    def remove(self, name: str) -> None:
        for params in self._dicts().values():
            if name in params:
                del params[name]
        del self.config[name]
        self._table_cache.clear()
        self.name_of_slot = {s: n for s, n in self.name_of_slot.items() if n != name}

    def params(self, name: str) -> dict[str, nn.Parameter]:
        return {part: cast(nn.Parameter, p[name]) for part, p in self._dicts().items() if name in p}

    # ------------------------------------------------------------------ forward
    def _one(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """``h`` plus adapter ``name``'s output, every row."""
        cfg, x = self.config[name], h.to(self.dtype)
        z = x
        if cfg.layer_norm:
            z = F.layer_norm(
                z, (self.features,), self.bn_norm_weight[name], self.bn_norm_bias[name], NORM_EPS
            )
        z = ACTIVATIONS[cfg.non_linearity](F.linear(z, self.bn_down_weight[name], self.bn_down_bias[name]))
        z = F.linear(z, self.bn_up_weight[name], self.bn_up_bias[name])
        return (x + cfg.scaling * z).to(h.dtype)

    def _mixed(self, rows: MixedRows, h: torch.Tensor) -> torch.Tensor:
        """``h`` plus each row's adapter (rows without one here: unchanged), by gather-and-bmm."""
        names = [self.name_of_slot.get(s) for s in rows.uniq]
        held = [n for n in names if n is not None]
        if not held:
            return h
        B, d = h.shape[0], self.features
        x = h.to(self.dtype).reshape(B, -1, d)
        out = x
        for act in dict.fromkeys(self.config[n].non_linearity for n in held):
            group = [n if n is not None and self.config[n].non_linearity == act else None for n in names]
            out = out + self._gathered(group, rows.inv, x, act)
        return out.reshape(h.shape).to(h.dtype)

    def _tables(self, names: list[str | None], like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The adapters' tensors stacked along a first axis, one entry per name (zeros for None; widths
        zero-padded to the widest). Cached without autograd (inference: a decode loop builds them once),
        keyed on the names and every tensor's version counter, so in-place updates are seen."""
        params = [self.params(n) if n is not None else {} for n in names]
        key = None
        if not torch.is_grad_enabled():
            # a tensor's version counter moves on every in-place change (optimizer steps, loads); torch
            # offers no public name for it
            versions = tuple(p._version for ps in params for p in ps.values())  # noqa: SLF001
            key = (tuple(names), like.device, versions)
            hit = self._table_cache.get(key)
            if hit is not None:
                return hit
        d = self.features
        width = max(self.config[n].width(d) for n in names if n is not None)

        def stacked(part: str, fill: torch.Tensor) -> torch.Tensor:
            items = []
            for ps in params:
                t = ps.get(part, fill)
                pad = width - t.shape[0 if part.startswith("down") else -1] if part != "up.bias" else 0
                if pad and part.startswith("down"):
                    t = F.pad(t, (0, 0, 0, pad) if t.dim() == 2 else (0, pad))
                elif pad and part == "up.weight":
                    t = F.pad(t, (0, pad))
                items.append(t)
            return torch.stack(items)

        tables = {
            "down.weight": stacked("down.weight", like.new_zeros(width, d)),  # (n, width, d)
            "down.bias": stacked("down.bias", like.new_zeros(width)),
            "up.weight": stacked("up.weight", like.new_zeros(d, width)),  # (n, d, width)
            "up.bias": stacked("up.bias", like.new_zeros(d)),
            "scaling": torch.tensor(
                [self.config[n].scaling if n is not None else 0.0 for n in names],
                dtype=like.dtype,
                device=like.device,
            ),
        }
        if any(n is not None and self.config[n].layer_norm for n in names):
            tables["norm.weight"] = stacked("norm.weight", like.new_ones(d))
            tables["norm.bias"] = stacked("norm.bias", like.new_zeros(d))
            tables["uses_norm"] = torch.tensor(
                [n is not None and self.config[n].layer_norm for n in names], device=like.device
            )
        if key is not None:
            if len(self._table_cache) >= 8:
                self._table_cache.pop(next(iter(self._table_cache)))
            self._table_cache[key] = tables
        return tables

    def _gathered(
        self, names: list[str | None], inv: torch.Tensor, x: torch.Tensor, act: str
    ) -> torch.Tensor:
        """The adapters' outputs for the rows whose adapter is in ``names`` (zeros for the others)."""
        tables = self._tables(names, x)
        z = x
        if "uses_norm" in tables:
            normed = F.layer_norm(x, (self.features,), eps=NORM_EPS)
            w, b = tables["norm.weight"][inv][:, None, :], tables["norm.bias"][inv][:, None, :]
            z = torch.where(tables["uses_norm"][inv].view(-1, 1, 1), normed * w + b, x)
        down, down_b = tables["down.weight"][inv], tables["down.bias"][inv]  # (B, width, d), (B, width)
        z = ACTIVATIONS[act](torch.baddbmm(down_b[:, None, :], z, down.transpose(1, 2)))
        up, up_b = tables["up.weight"][inv], tables["up.bias"][inv]  # (B, d, width), (B, d)
        scale = tables["scaling"][inv].view(-1, 1, 1)
        return scale * torch.baddbmm(up_b[:, None, :], z, up.transpose(1, 2))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The projection's output plus each row's adapter (a stack's levels apply in turn)."""
        h = self.base_layer(x, *args, **kwargs)
        if not self.name_of_slot:
            return h
        sel: BottleneckSelection = self._route.get("bottleneck")
        for level in sel if isinstance(sel, tuple) else (sel,):
            if isinstance(level, int):
                name = self.name_of_slot.get(level)
                if name is not None:
                    h = self._one(name, h)
            else:
                h = self._mixed(level.for_batch(h.shape[0]), h)
        return h

    def extra_repr(self) -> str:
        return f"features={self.features}, adapters={list(self.config)}"


class BottleneckMethod(LayerMethod):
    """Owns every :class:`BottleneckLayer` of one model. Selection: an int slot (every row),
    :class:`MixedRows`, or a tuple of those (a stack: the levels apply one after the other)."""

    name = "bottleneck"
    config_class = BottleneckConfig

    def __init__(self, model: nn.Module, route: Route, *, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(model, route, adapter_dtype=adapter_dtype)
        self.layers: dict[str, BottleneckLayer] = {}

    def _targets(self, config: BottleneckConfig) -> tuple[str, ...] | str:
        if config.targets is not None:
            return config.targets
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        known = OUTPUT_PROJECTIONS.get(model_type or "")
        if known is None:
            raise ValueError(
                f"BottleneckConfig(placement={config.placement!r}) does not know the output projections of model "
                f"type {model_type!r} (known: {sorted(OUTPUT_PROJECTIONS)}): pass targets=(...) with the module-"
                "name suffixes of the attention and/or feed-forward output layers, e.g. ('o_proj', 'down_proj')"
            )
        return known[1] if config.placement == "pfeiffer" else f"(?:{known[0]})|(?:{known[1]})"

    def _match(self, config: BottleneckConfig) -> list[str]:
        targets = self._targets(config)
        paths = target_paths(self.model, lambda n: _matches(targets, n), BottleneckLayer)
        if not paths:
            wanted = [targets] if isinstance(targets, str) else list(targets)
            raise ValueError(
                f"bottleneck targets {wanted} match no Linear/Conv1D module of {type(self.model).__name__}"
            )
        return paths

    def _wrap(self, path: str) -> BottleneckLayer:
        return self.wrap(path, lambda m: BottleneckLayer(m, self.route, self.adapter_dtype))

    # ---------------------------------------------------------------- adapters
    @override
    def add(self, name: str, config: BottleneckConfig) -> None:
        paths = self._match(config)  # raises before anything is attached
        slot = self.next_slot()
        for path in paths:
            self._wrap(path).add(name, slot, config)
        self.slot[name], self.paths[name] = slot, paths

    @override
    def remove(self, name: str) -> None:
        for path in self.paths.pop(name):
            self.layers[path].remove(name)
        del self.slot[name]

    @override
    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """``{"<module path>.bottleneck.<down|up|norm>.<weight|bias>": tensor}``."""
        return {
            f"{p}.bottleneck.{part}": t
            for p in self.paths[name]
            for part, t in self.layers[p].params(name).items()
        }

    @override
    def owns_parameter(self, qualified_name: str, parameter: nn.Parameter) -> bool:
        return re.search(r"\.bn_(down|up|norm)_(weight|bias)\.", qualified_name) is not None

    # ---------------------------------------------------------------- files (adapters_mtl's format)
    @override
    @classmethod
    def owns_peft_key(cls, key: str) -> bool:
        return any(key.endswith(f".bottleneck.{part}") for part in PARTS)

    @override
    @classmethod
    def check_peft_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        problems = []
        for key, t in tensors.items():
            part = key.rpartition(".bottleneck.")[2]
            if ".bottleneck." not in key or part not in PARTS:
                problems.append(f"unexpected key {key!r} (expected <module>.bottleneck.<{'|'.join(PARTS)}>)")
            elif t.dim() != (2 if part.endswith("weight") and part != "norm.weight" else 1):
                problems.append(
                    f"{key}: a tensor of shape {tuple(t.shape)} has the wrong number of dimensions"
                )
        return problems

    @override
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        return {
            f"{PEFT_PREFIX}{k}": p.detach().contiguous().clone() for k, p in self.adapter_params(name).items()
        }

    @override
    @torch.no_grad()
    def load_peft_state(self, name: str, state: Mapping[str, torch.Tensor], key_maps: KeyMap) -> list[str]:
        mine = self.adapter_params(name)

        def own_key(key: str, fn: Callable[[str], str | None]) -> str | None:
            path, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".bottleneck.")
            mapped = fn(path)
            return None if mapped is None else f"{mapped}.bottleneck.{part}"

        best = match_saved_keys(state, mine, key_maps, own_key)
        problems = [f"unexpected key {k}" for k in state if k not in best][:8]
        missing = sorted(set(mine) - set(best.values()))
        if missing:
            problems.append(f"missing keys: {missing[:8]}")
        for key, own in best.items():
            if state[key].shape != mine[own].shape:
                problems.append(
                    f"{key}: shape {tuple(state[key].shape)} but the adapter expects {tuple(mine[own].shape)}"
                )
        if not problems:
            for key, own in best.items():
                mine[own].copy_(state[key].to(mine[own].dtype))
        return problems
