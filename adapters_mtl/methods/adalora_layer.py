"""AdaLoRA's layer: per adapter PEFT's SVD triplet ``lora_A`` (r, in), ``lora_E`` (r, 1), ``lora_B`` (out, r)
on one Linear/Conv1D, adding ``(x·(A⊙E)ᵀ·Bᵀ)·scaling/(ranknum + 1e-5)`` (PEFT's exact order of operations)
for each row's adapter: one adapter for every row is two matmuls; a mixed batch gathers each row's
factors into two batched matmuls (as LoRA's routed path). Rank allocation masks triplets by zeroing E
entries; the layer keeps ``init_r`` rows throughout."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import adapter_dtype_for
from ..core.quantize import compute_dtype, linear_features, refuse_merge
from ..core.routing import MixedRows, Route
from .wrapped import innermost

__all__ = ["AdaLoraLayer", "Selection"]

Selection = int | MixedRows | tuple[int | MixedRows, ...]


class AdaLoraLayer(nn.Module):
    """Wraps one layer (the outermost module at the target's path); adds each row's adapter update."""

    _route: Route

    def __init__(self, base_layer: nn.Module, route: Route, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = not isinstance(innermost(base_layer), nn.Linear)  # Conv1D stores (in, out)
        # from the module (a quantized weight may be packed); a quantized base's adapters are never int8
        self.in_features, self.out_features = linear_features(innermost(base_layer))
        self.dtype = dtype or adapter_dtype_for(compute_dtype(innermost(base_layer)))
        self.lora_A = nn.ParameterDict()  # name -> (r, in) right singular vectors
        self.lora_E = nn.ParameterDict()  # name -> (r, 1) singular values
        self.lora_B = nn.ParameterDict()  # name -> (out, r) left singular vectors
        self.scaling: dict[str, float] = {}
        # PEFT's ``ranknum + 1e-5``, computed in fp32 as PEFT does, so dividing by it rounds alike
        self.ranknum: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.name_of_slot: dict[int, str] = {}
        # inference tables of a mixed batch: (names, device, tensor versions) -> stacked factors
        self._table_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self.merged: str | None = None
        self._original: list[nn.Parameter] = []  # the weight set aside by merge (a list: not registered)
        object.__setattr__(self, "_route", route)  # shared, not a submodule

    def add(self, name: str, slot: int, r: int, scaling: float, dropout: float, init: str) -> None:
        w = cast(torch.Tensor, innermost(self.base_layer).weight)
        A, E, B = (
            torch.zeros(r, self.in_features, dtype=self.dtype, device=w.device),
            torch.zeros(r, 1, dtype=self.dtype, device=w.device),
            torch.zeros(self.out_features, r, dtype=self.dtype, device=w.device),
        )
        if init == "default":  # PEFT's reset_lora_parameters: E zero (identity), A and B N(0, 0.02²)
            nn.init.normal_(A, std=0.02)
            nn.init.normal_(B, std=0.02)
        elif init == "random":  # PEFT's init_lora_weights=False: all standard normal
            A, E, B = torch.randn_like(A), torch.randn_like(E), torch.randn_like(B)
        self.lora_A[name], self.lora_E[name], self.lora_B[name] = (
            nn.Parameter(A),
            nn.Parameter(E),
            nn.Parameter(B),
        )
        self.scaling[name], self.dropout[name] = scaling, dropout
        self.ranknum[name] = float(torch.tensor(float(r)) + 1e-5)
        self.name_of_slot[slot] = name

    def remove(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        del self.lora_A[name], self.lora_E[name], self.lora_B[name]
        del self.scaling[name], self.ranknum[name], self.dropout[name]
        self._table_cache.clear()
        self.name_of_slot = {s: n for s, n in self.name_of_slot.items() if n != name}

    def update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``name``'s update of rows ``x`` (..., in) -> (..., out), as PEFT's ``SVDLinear.forward``."""
        A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        x = x.to(A.dtype)
        if self.training and self.dropout[name] > 0:
            x = F.dropout(x, self.dropout[name], training=True)
        return (x @ (A * E).T @ B.T) * self.scaling[name] / self.ranknum[name]

    def _level(self, x: torch.Tensor, sel: int | MixedRows) -> torch.Tensor | None:
        """One routing level's update (None when no row of it has an adapter here)."""
        if isinstance(sel, int):
            name = self.name_of_slot.get(sel)
            return None if name is None or name == self.merged else self.update(x, name)
        if self.merged is not None:
            raise RuntimeError(
                f"adapter {self.merged!r} is merged into this layer; unmerge() before mixing rows"
            )
        rows = sel.for_batch(x.shape[0])
        names = [self.name_of_slot.get(s) for s in rows.uniq]
        if all(n is None for n in names):
            return None
        if not (self.training and any(self.dropout[n] > 0 for n in names if n is not None)):
            return self._gathered(x, names, rows.inv)
        delta: torch.Tensor | None = None
        for s in rows.uniq:  # one update per distinct adapter over its rows: gradients reach only those
            name = self.name_of_slot.get(s)
            if name is None:
                continue
            idx = (rows.idx == s).nonzero(as_tuple=True)[0]
            part = self.update(x.index_select(0, idx), name)  # (n, ..., out)
            if delta is None:
                delta = part.new_zeros(*x.shape[:-1], self.out_features)
            delta = delta.index_copy(0, idx, part)
        return delta

    def _tables(self, names: list[str | None], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(A⊙E) (n, r, in) and B (n, out, r) of the distinct adapters (zeros for None; ranks zero-padded to
        the largest) and their scales (n,). Cached without autograd, keyed on the names and the tensors'
        version counters (in-place updates, e.g. rank masking, are seen)."""
        key = None
        if not torch.is_grad_enabled():
            params = [
                t for n in names if n is not None for t in (self.lora_A[n], self.lora_E[n], self.lora_B[n])
            ]
            # a tensor's version counter moves on every in-place change; torch has no public name for it
            key = (tuple(names), like.device, tuple(t._version for t in params))  # noqa: SLF001
            if key in self._table_cache:
                return self._table_cache[key]
        dtype = next(iter(self.lora_A.values())).dtype
        r = max(self.lora_A[n].shape[0] for n in names if n is not None)
        AE, Bs, scales = [], [], []
        for n in names:
            if n is None:
                AE.append(like.new_zeros(r, self.in_features, dtype=dtype))
                Bs.append(like.new_zeros(self.out_features, r, dtype=dtype))
                scales.append(0.0)
                continue
            k = r - self.lora_A[n].shape[0]
            AE.append(F.pad(self.lora_A[n] * self.lora_E[n], (0, 0, 0, k)))
            Bs.append(F.pad(self.lora_B[n], (0, k)))
            scales.append(self.scaling[n] / self.ranknum[n])
        tables = (torch.stack(AE), torch.stack(Bs), torch.tensor(scales, dtype=dtype, device=like.device))
        if key is not None:
            if len(self._table_cache) >= 8:
                self._table_cache.pop(next(iter(self._table_cache)))
            self._table_cache[key] = tables
        return tables

    def _gathered(self, x: torch.Tensor, names: list[str | None], inv: torch.Tensor) -> torch.Tensor:
        """Every row's update by gather-and-bmm (each row's factors gathered, two batched matmuls), as
        LoRA's routed path; rows without an adapter here get zeros."""
        AE, Bs, scales = self._tables(names, x)
        B = x.shape[0]
        x3 = x.reshape(B, -1, self.in_features).to(AE.dtype)
        z = torch.bmm(x3, AE[inv].transpose(1, 2))  # (B, T, r)
        delta = torch.bmm(z, Bs[inv].transpose(1, 2)) * scales[inv].view(B, 1, 1)
        return delta.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not self.name_of_slot:
            return out
        sel: Selection = self._route.get("adalora")
        for level in sel if isinstance(sel, tuple) else (sel,):  # a stack adds its levels' updates
            delta = self._level(x, level)
            if delta is not None:
                out = out + delta.to(out.dtype)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in the base weight's layout ((out, in), or (in, out) for Conv1D), as PEFT's ``get_delta_weight``."""
        dw = (
            self.lora_B[name]
            @ (self.lora_A[name] * self.lora_E[name])
            * self.scaling[name]
            / self.ranknum[name]
        )
        return dw.T if self.fan_in_fan_out else dw

    @torch.no_grad()
    def merge(self, name: str, keep_original: bool = True) -> None:
        """Fold ``name`` into the base weight; ``keep_original``: ``unmerge`` restores the exact tensor."""
        inner = innermost(self.base_layer)
        # a quantized weight: a clear error before anything changes
        refuse_merge([("this layer", inner)], name)
        w = cast(torch.Tensor, inner.weight)
        if keep_original:
            self._original = [cast(nn.Parameter, w)]
            inner.weight = nn.Parameter(w + self.delta_weight(name).to(w.dtype), requires_grad=False)
        else:
            w.add_(self.delta_weight(name).to(w.dtype))
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            return
        inner = innermost(self.base_layer)
        if self._original:
            inner.weight, self._original = self._original[0], []
        else:
            w = cast(torch.Tensor, inner.weight)
            w.sub_(self.delta_weight(self.merged).to(w.dtype))
        self.merged = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.lora_A)}, merged={self.merged}"
