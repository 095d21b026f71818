"""LoRA layer: every adapter's A/B for one Linear (or GPT-2 Conv1D), routed per row; DoRA adapters too.

Storage: each adapter's ``A`` (r, in) and ``B`` (out, r) are ``nn.Parameter`` views into two stacked
tensors ``stack_A`` (S, r_max, in) and ``stack_B`` (S, out, r_max), one slot per adapter (slot 0 is
always zero = "no LoRA"). The views make each adapter a normal parameter for optimisers, saving and
gradients, while inference gathers rows straight from the stacks without copying per call.
We write this by hand because PEFT's per-row path (``adapter_names``) loops over adapters in Python
and keeps no stacked storage; see README "Routing algorithm".

DoRA (Liu et al. 2024, PEFT's ``use_dora``): a DoRA adapter also has a magnitude vector ``m`` (out,), a
parameter of its own (``lora_magnitude_vector[name]``), and its weight is ``W' = g·(W + s·B·A)`` with
``g = m/‖W + s·B·A‖`` per output channel. Its update of the output is ``(g − 1)·W·x + g·s·B·A·x``, computed
for the rows routed to it (``g = 1`` on every other row, so the same expression adds plain LoRA rows'
updates unchanged). The norm is a constant for backward (detached, as in the paper and PEFT) and is
cached per adapter outside training. A layer that holds no DoRA adapter runs the plain LoRA code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import adapter_dtype_for
from ..core.quantize import compute_dtype, dense_weight, linear_features, refuse_merge
from ..core.routing import MixedRows, Route, StaticSlot

__all__ = ["LoraLayer", "is_lora_target_type"]

# torch's segmented GEMM (rows grouped by offsets, one weight per group): private in torch 2.13 but the
# kernel MoE layers use (CUDA grouped-GEMM on sm90+, a reference loop elsewhere); only the "segment" routing
# strategy calls it, and the tests run that strategy on CPU against the others.
_grouped_mm = torch._grouped_mm  # noqa: SLF001

# What the layer reads from the routing (see LoraMethod.selection): one slot for every row (0 = none),
# each row's slot, the slot tensor of static routing, or a stack of levels.
LoraSelection = int | MixedRows | StaticSlot | tuple[int | MixedRows, ...]


def _conv1d_type() -> type[nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_lora_target_type(module: nn.Module) -> bool:
    """Layers LoRA can wrap: ``nn.Linear`` (bitsandbytes' quantized ``Linear8bitLt``/``Linear4bit`` are
    subclasses) and transformers' ``Conv1D`` (GPT-2)."""
    return isinstance(module, (nn.Linear, _conv1d_type()))


class LoraLayer(nn.Module):
    """Wraps one frozen base layer; adds ``s·(x·Aᵀ)·Bᵀ`` for each row's adapter.

    Args:
        base_layer: the frozen ``nn.Linear`` or ``Conv1D``.
        route: the owning model's :class:`Route` (each call's routing is read from it per thread).
        dtype: the dtype of the adapters' weights (None: :func:`adapter_dtype_for` the base weight's).
    """

    # buffers (registered in __init__, replaced whole when the stacks grow) and the shared routing (set
    # with object.__setattr__): declared so that reads are typed, not nn.Module.__getattr__'s union
    stack_A: torch.Tensor
    stack_B: torch.Tensor
    scales: torch.Tensor
    _route: Route

    def __init__(self, base_layer: nn.Module, route: Route, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, _conv1d_type())
        w = cast(torch.Tensor, base_layer.weight)  # a Linear's or Conv1D's (maybe quantized, packed)
        # a quantized base: fp32 adapters (or its compute dtype's), never the int8/uint8 storage dtype
        dtype = dtype or adapter_dtype_for(compute_dtype(base_layer))
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A = nn.ParameterDict()  # name -> (r, in), a view into stack_A
        self.lora_B = nn.ParameterDict()  # name -> (out, r), a view into stack_B
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only: name -> m (out,)
        self.register_buffer("stack_A", w.new_zeros(1, 1, self.in_features, dtype=dtype), persistent=False)
        self.register_buffer("stack_B", w.new_zeros(1, self.out_features, 1, dtype=dtype), persistent=False)
        self.register_buffer("scales", torch.zeros(1, device=w.device), persistent=False)  # fp32 always
        self.slots: dict[str, int] = {}
        self.ranks: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self._name_of_slot: dict[int, str] = {}
        self._dora_slots: set[int] = set()  # slots of the DoRA adapters (empty: the plain LoRA path)
        # DoRA: name -> (what the norm was computed from, ‖W + s·B·A‖ (out,)); see _weight_norm
        self._norms: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}
        self.merged: str | None = None
        self._original: list[nn.Parameter] = []  # the weight set aside by merge (a list: not registered)
        self._merged_norm: torch.Tensor | None = None  # DoRA merged in place: the norm unmerge divides by
        object.__setattr__(self, "_route", route)  # shared, not a submodule
        self.register_load_state_dict_post_hook(LoraLayer._after_load)

    # ----------------------------------------------------------------- storage
    def grow(self, slots: int, r_max: int) -> None:
        """Grow the stacks to hold ``slots`` slots of rank ``r_max``; re-point every adapter's views."""
        old_A, old_B = self.stack_A, self.stack_B
        S0, r0 = old_A.shape[0], old_A.shape[1]
        if slots <= S0 and r_max <= r0:
            return
        S, R = max(slots, 2 * S0 if slots > S0 else S0), max(r_max, r0)
        new_A = old_A.new_zeros(S, R, self.in_features)
        new_B = old_B.new_zeros(S, self.out_features, R)
        new_A[:S0, :r0] = old_A
        new_B[:S0, :, :r0] = old_B
        scales = self.scales.new_zeros(S, dtype=torch.float32)
        scales[:S0] = self.scales
        self.stack_A, self.stack_B, self.scales = new_A, new_B, scales
        self._repoint()

    def fit(self, slots: int) -> None:
        """Shrink the stacks to exactly ``slots`` slots and the largest rank in use (spare capacity freed)."""
        r_max = max(self.ranks.values(), default=1)
        if self.stack_A.shape[0] == slots and self.stack_A.shape[1] == r_max:
            return
        self.stack_A = self.stack_A[:slots, :r_max].clone()
        self.stack_B = self.stack_B[:slots, :, :r_max].clone()
        self.scales = self.scales[:slots].clone()
        self._repoint()

    def _repoint(self) -> None:
        self._norms.clear()  # the stacks (or their values) were replaced
        for name, slot in self.slots.items():
            r = self.ranks[name]
            self.lora_A[name].data = self.stack_A[slot, :r]
            self.lora_B[name].data = self.stack_B[slot, :, :r]

    def _resync(self) -> None:
        """Copy every adapter's parameter values into the stacks and re-point the views.

        Needed whenever parameters were replaced rather than updated in place: ``.to()``/``.half()``
        (which convert parameters and buffers one by one), ``copy.deepcopy``/unpickling, and
        ``load_state_dict(assign=True)``.
        """
        with torch.no_grad():
            for name, slot in self.slots.items():
                r = self.ranks[name]
                self.stack_A[slot, :r].copy_(self.lora_A[name].data)
                self.stack_B[slot, :, :r].copy_(self.lora_B[name].data)
        self._repoint()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LoraLayer:
        super()._apply(fn, recurse)
        self.scales = self.scales.float()  # scales stay fp32 whatever the model's dtype
        if self._original:  # the weight set aside by merge() follows the module's device/dtype too
            self._original = [nn.Parameter(fn(self._original[0]), requires_grad=False)]
        if self._merged_norm is not None:
            self._merged_norm = fn(self._merged_norm)
        self._resync()
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:  # copy.deepcopy and unpickling
        super().__setstate__(state)
        self._resync()

    @staticmethod
    def _after_load(module: LoraLayer, _incompatible_keys: object) -> None:
        module._resync()

    def add(
        self, name: str, slot: int, r: int, scaling: float, dropout: float, init: str, dora: bool = False
    ) -> None:
        """Allocate ``name`` at global ``slot`` with rank ``r`` and scale ``scaling``; with ``dora``, also its
        magnitude vector, initialised to ``‖W + s·B·A‖`` per output channel (the adapter starts as LoRA)."""
        if name in self.slots:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        self.grow(slot + 1, r)
        A = self.stack_A[slot, :r]
        B = self.stack_B[slot, :, :r]
        with torch.no_grad():
            if init == "zeros":
                A.zero_()
            elif init == "gaussian":
                nn.init.normal_(A, std=1.0 / r)
            else:
                # PEFT's default: Kaiming-uniform A, zero B (the adapter starts as the identity).
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init == "random":
                nn.init.normal_(B, std=0.02)
            else:
                B.zero_()
            self.scales[slot] = scaling
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.slots[name], self.ranks[name] = slot, r
        self.scaling[name], self.dropout[name] = scaling, dropout
        self._name_of_slot[slot] = name
        if dora:
            self.lora_magnitude_vector[name] = nn.Parameter(
                self.weight_norm(name, self.stack_A.dtype).clone()
            )
            self._dora_slots.add(slot)

    def remove(self, name: str) -> None:
        """Free ``name``'s slot (zeroed so stale values can never be gathered)."""
        if self.merged == name:
            self.unmerge()
        slot = self.slots.pop(name)
        del self.lora_A[name], self.lora_B[name]
        with torch.no_grad():
            self.stack_A[slot].zero_()
            self.stack_B[slot].zero_()
            self.scales[slot] = 0
        del self.ranks[name], self.scaling[name], self.dropout[name], self._name_of_slot[slot]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
            self._dora_slots.discard(slot)
            self._norms.pop(name, None)

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """The parameters that make up ``name`` in this layer (as declared, not matched by name): ``lora_A``,
        ``lora_B`` and, for a DoRA adapter, ``lora_magnitude_vector``."""
        out = {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name]}
        if name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return out

    def is_dora(self, name: str) -> bool:
        """Whether ``name`` is a DoRA adapter here."""
        return name in self.lora_magnitude_vector

    # ----------------------------------------------------------------- DoRA
    def weight_norm(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """DoRA's ``‖W + s·B·A‖`` of adapter ``name`` per output channel (out,), detached, computed in
        ``dtype`` (default: the adapters' dtype) as PEFT does.

        Cached outside training (nothing that needs gradients of A or B): the cache is keyed on the base
        weight and the factors (their storage and ``_version`` counters, which every in-place update
        bumps: optimizer steps, ``copy_`` of a load), and cleared whenever the stacks are replaced.
        Values written through ``.data`` bypass the counters: call :meth:`clear_dora_cache` after that.
        """
        A, B = self.lora_A[name], self.lora_B[name]
        w = cast(torch.Tensor, self.base_layer.weight)
        dtype = dtype or self.stack_A.dtype
        cacheable = not (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad))
        # in-place updates bump _version (no public API; files.fingerprint keys its cache the same way)
        key = tuple((t.data_ptr(), t._version) for t in (w, A, B)) + (dtype,)  # noqa: SLF001
        if cacheable:
            hit = self._norms.get(name)
            if hit is not None and hit[0] == key:
                return hit[1]
        with torch.no_grad():
            W = dense_weight(self.base_layer, dtype)  # dequantized on a quantized base
            W = W.T if self.fan_in_fan_out else W  # (out, in)
            norm = torch.linalg.norm(W + self.scaling[name] * (B.to(dtype) @ A.to(dtype)), dim=1)
        if cacheable:
            self._norms[name] = (key, norm)
        return norm

    def clear_dora_cache(self) -> None:
        """Forget the cached DoRA weight norms (needed only after values were written through ``.data``)."""
        self._norms.clear()

    def _dora_scale(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``g = m/‖W + s·B·A‖`` (out,): gradients reach ``m``, never the norm."""
        return self.lora_magnitude_vector[name].to(dtype) / self.weight_norm(name, dtype)

    def _base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``W·x`` without the bias, in ``x``'s dtype (the base term of a DoRA row whose input was dropped out)."""
        W = dense_weight(self.base_layer, x.dtype)
        return F.linear(x, W.T if self.fan_in_fan_out else W)

    # ----------------------------------------------------------------- merging
    def delta_weight(self, name: str) -> torch.Tensor:
        """``s·B·A`` in the base weight's layout ((out, in) for Linear, (in, out) for Conv1D); for a DoRA
        adapter the low-rank part only (its merged weight also rescales the output channels)."""
        delta = (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, name: str, keep_original: bool = True) -> None:
        """Fold ``name`` into the base weight.

        With ``keep_original`` the merged weight is a new tensor and the original parameter is kept
        aside, so ``unmerge`` is bit-exact and a weight tied to another module (e.g. an LM head tied to
        the input embeddings) is never modified. Without it the weight is updated in place (no extra
        memory; ``unmerge`` subtracts, exact up to fp round-off).
        """
        if self.merged == name:
            return
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is already merged here; unmerge() first")
        # a quantized weight: a clear error before anything changes
        refuse_merge([("this layer", self.base_layer)], name)
        w = cast(nn.Parameter, self.base_layer.weight)
        if self.is_dora(name):  # W' = g·(W + s·B·A), g per output channel from the unmerged W
            delta = self.delta_weight(name)
            norm = self.weight_norm(name, delta.dtype)
            g = self.lora_magnitude_vector[name].to(delta.dtype) / norm
            g = g.view(1, -1) if self.fan_in_fan_out else g.view(-1, 1)  # over the output channels
            new = (g * (w.to(delta.dtype) + delta)).to(w.dtype)
            if keep_original:
                self._original = [w]
                self.base_layer.weight = nn.Parameter(new, requires_grad=False)
            else:
                self._merged_norm = norm
                w.copy_(new)
            self.merged = name
            return
        delta = self.delta_weight(name).to(w.dtype)
        if keep_original:
            self._original = [w]
            self.base_layer.weight = nn.Parameter(w + delta, requires_grad=False)
        else:
            w.add_(delta)
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight (bit-exact when merged with ``keep_original=True``)."""
        if self.merged is None:
            return
        if self._original:
            self.base_layer.weight = self._original.pop()
        elif self._merged_norm is not None:  # DoRA in place: W = W'/g − s·B·A (exact up to round-off)
            w = cast(nn.Parameter, self.base_layer.weight)
            delta = self.delta_weight(self.merged)
            g = self.lora_magnitude_vector[self.merged].to(delta.dtype) / self._merged_norm
            g = g.view(1, -1) if self.fan_in_fan_out else g.view(-1, 1)
            w.copy_((w.to(delta.dtype) / g - delta).to(w.dtype))
            self._merged_norm = None
        else:
            w = cast(nn.Parameter, self.base_layer.weight)
            w.sub_(self.delta_weight(self.merged).to(w.dtype))
        self.merged = None

    # ----------------------------------------------------------------- forward
    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return F.dropout(x, p, training=True) if (self.training and p > 0) else x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output plus each row's LoRA update (``x``: (..., in) → (..., out))."""
        out = self.base_layer(x, *args, **kwargs)
        if not self.slots:
            return out
        # this thread's call, else the default: one read per layer call
        sel: LoraSelection = self._route.get("lora")
        # computed in the adapters' dtype (fp32 on a half-precision base, as PEFT's autocast_adapter_dtype),
        # added to the output in its own; a no-op when the two agree
        x = x.to(self.stack_A.dtype)
        if isinstance(sel, StaticSlot):  # never a DoRA slot (LoraMethod.static_selection)
            if not (self.training and torch.is_grad_enabled()):
                return out + self._static_delta(x, sel.slot).to(out.dtype)
            sel = int(sel.slot)  # training: the ordinary path, so gradients reach the adapter's parameters
        if self._dora_slots and _routes(sel, self._dora_slots):
            return self._forward_dora(x, sel, out)
        if isinstance(sel, tuple):  # a stack: the levels' updates add up
            for level in sel:
                out = self._add_update(out, x, level)
            return out
        return self._add_update(out, x, sel)

    def _add_update(self, out: torch.Tensor, x: torch.Tensor, sel: int | MixedRows) -> torch.Tensor:
        """``out`` plus the LoRA update of one routing level (``out`` itself when no row of it uses this
        layer). When ``out`` is in the adapters' dtype the second matmul accumulates straight into it
        (``addmm``/``baddbmm`` with the scale as ``alpha``): no separate scale and add passes over the
        (tokens, out) activations, forward or backward."""
        if isinstance(sel, int):
            name = self._name_of_slot.get(sel)
            if name is None or name == self.merged:
                return out
            A, B = self.lora_A[name], self.lora_B[name]
            h = F.linear(self._dropout(x, self.dropout[name]), A.to(x.dtype))  # (..., r)
            if out.dtype != x.dtype:
                return out + (F.linear(h, B.to(x.dtype)) * self.scaling[name]).to(out.dtype)
            fused = torch.addmm(
                out.reshape(-1, self.out_features),
                h.reshape(-1, h.shape[-1]),
                B.to(x.dtype).t(),
                alpha=self.scaling[name],
            )
            return fused.view(out.shape)
        rows = sel.for_batch(x.shape[0])
        self._refuse_merged_rows()
        strategy = self._route.strategy  # a setting of the model, not of the call
        if strategy == "group":
            return out + self._grouped(x, rows).to(out.dtype)
        if strategy == "segment":
            return out + self._segmented(x, rows).to(out.dtype)
        return self._gathered(x, rows, into=out)

    def _refuse_merged_rows(self) -> None:
        if self.merged is not None:
            raise RuntimeError(
                f"adapter {self.merged!r} is merged into the base weights, so rows routed to other adapters "
                "would see its update too; call unmerge() before routing a mixed batch."
            )

    def _forward_dora(
        self, x: torch.Tensor, sel: int | MixedRows | tuple[int | MixedRows, ...], out: torch.Tensor
    ) -> torch.Tensor:
        """The output when some row uses a DoRA adapter here. Every level of a stack adds its update
        relative to the frozen base weight, so a DoRA level adds ``(g − 1)·W·x + g·s·B·A·x``."""
        bias = cast("torch.Tensor | None", self.base_layer.bias)
        base = (out if bias is None else out - bias).to(x.dtype)  # (..., out): W·x, as PEFT reads it
        result = out
        for level in sel if isinstance(sel, tuple) else (sel,):
            if _routes(level, self._dora_slots):
                result = result + self._dora_delta(x, level, base, out.dtype)
            else:
                result = self._add_update(result, x, level)
        return result

    def _dora_delta(
        self, x: torch.Tensor, sel: int | MixedRows, base: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor | float:
        """The update of one routing level that routes some row to a DoRA adapter (``base``: W·x)."""
        if isinstance(sel, int):
            name = self._name_of_slot[sel]
            if name == self.merged:
                return 0.0
            xd = self._dropout(x, self.dropout[name])
            h = F.linear(xd, self.lora_A[name].to(x.dtype))  # (..., r)
            lora = F.linear(h, self.lora_B[name].to(x.dtype)) * self.scaling[name]  # (..., out)
            g: torch.Tensor = self._dora_scale(name, x.dtype)  # (out,)
        else:
            self._refuse_merged_rows()
            rows = sel.for_batch(x.shape[0])
            # one dropout mask for the LoRA and the base term of a row, as PEFT's DoRA
            xd = self._rows_dropout(x, rows) if self.training else x
            if self._route.strategy == "group":
                lora = self._grouped(xd, rows, drop=False)
            elif self._route.strategy == "segment":
                lora = self._segmented(xd, rows, drop=False)
            else:
                lora = self._gathered(xd, rows, drop=False)
            # g per distinct slot (1 for plain LoRA and no adapter), then per row: (B, 1, ..., out)
            ones = x.new_ones(self.out_features)
            g_u = [
                self._dora_scale(self._name_of_slot[s], x.dtype) if s in self._dora_slots else ones
                for s in rows.uniq
            ]
            g = (
                torch.stack(g_u)
                .index_select(0, rows.inv)
                .view(x.shape[0], *([1] * (x.dim() - 2)), self.out_features)
            )
        b = base if xd is x else self._base_linear(xd)  # dropped-out input: W·dropout(x), as PEFT
        return ((g - 1) * b + g * lora).to(dtype)

    def _static_delta(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """The update of the slot held in ``slot`` (a tensor), at full stack rank, without Python branching
        on which adapter it is (slot 0 and freed slots are zeros)."""
        A = self.stack_A.index_select(0, slot)[0].to(x.dtype)  # (R, in)
        B = self.stack_B.index_select(0, slot)[0].to(x.dtype)  # (out, R)
        A, B = _common_rank(A, B, 0, 1)
        return F.linear(F.linear(x, A), B) * self.scales.index_select(0, slot).to(x.dtype)

    def _rows_dropout(self, x: torch.Tensor, rows: MixedRows) -> torch.Tensor:
        """Each row's own adapter's LoRA dropout (inverted dropout, as F.dropout); ``x`` itself when no
        routed adapter has dropout."""
        p_u = [self.dropout.get(self._name_of_slot.get(s, ""), 0.0) for s in rows.uniq]
        if not any(p > 0 for p in p_u):
            return x
        shape = (x.shape[0], *([1] * (x.dim() - 1)))
        p_rows = torch.tensor(p_u, device=x.device, dtype=x.dtype)[rows.inv].view(shape)
        keep = (torch.rand_like(x) >= p_rows).to(x.dtype) / (1 - p_rows)
        return x * keep

    def _rows_need_grad(self, rows: MixedRows) -> bool:
        """Whether gradients must reach some routed adapter's parameters (the training path of
        :meth:`_gathered`; :meth:`_segmented` then defers to it)."""
        return torch.is_grad_enabled() and any(
            self.lora_A[n].requires_grad for s in rows.uniq if (n := self._name_of_slot.get(s)) is not None
        )

    def _gathered(
        self, x: torch.Tensor, rows: MixedRows, drop: bool = True, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Gather each row's A/B, then two batched matmuls: cost independent of how many adapters
        (``drop``: apply the rows' LoRA dropout in training). With ``into`` (the base output), returns
        ``into`` plus the update, accumulated by the second matmul when the dtypes agree."""
        Bsz = x.shape[0]
        x3 = x.reshape(Bsz, -1, self.in_features)  # (B, T, in)
        if self._rows_need_grad(rows):
            # Training: stack the used adapters' parameters (a few tasks per batch) so gradients
            # flow to exactly those; rows of other slots gather zeros.
            R = self.stack_A.shape[1]
            A_u, B_u, s_u = [], [], []
            for s in rows.uniq:
                n = self._name_of_slot.get(s)
                if n is None:
                    A_u.append(self.stack_A.new_zeros(R, self.in_features))
                    B_u.append(self.stack_B.new_zeros(self.out_features, R))
                    s_u.append(0.0)
                else:
                    r = self.ranks[n]
                    A_u.append(F.pad(self.lora_A[n], (0, 0, 0, R - r)))
                    B_u.append(F.pad(self.lora_B[n], (0, R - r)))
                    s_u.append(self.scaling[n])
            A_rows = torch.stack(A_u).index_select(0, rows.inv)  # (B, R, in)
            B_rows = torch.stack(B_u).index_select(0, rows.inv)  # (B, out, R)
            s_rows = torch.tensor(s_u, device=x.device, dtype=torch.float32).index_select(0, rows.inv)
        else:
            # index_select, not stack_A[rows.idx]: the same values, ~5x faster on CPU (advanced indexing
            # takes a generic path: 190 vs 38 µs for q_proj's stack at decode B=64)
            A_rows = self.stack_A.index_select(0, rows.idx)  # (B, R, in)
            B_rows = self.stack_B.index_select(0, rows.idx)  # (B, out, R)
            s_rows = self.scales.index_select(0, rows.idx)
            A_rows, B_rows = _common_rank(A_rows, B_rows, 1, 2)
        if drop and self.training:
            x3 = self._rows_dropout(x3, rows)
        h = torch.bmm(x3, A_rows.transpose(1, 2).to(x.dtype))  # (B, T, R)
        h = h * s_rows.to(x.dtype).view(Bsz, 1, 1)
        Bt = B_rows.transpose(1, 2).to(x.dtype)
        if into is not None and into.dtype == x.dtype:
            return torch.baddbmm(into.reshape(Bsz, -1, self.out_features), h, Bt).view(into.shape)
        delta = torch.bmm(h, Bt).reshape(*x.shape[:-1], self.out_features)  # (..., out)
        return delta if into is None else into + delta.to(into.dtype)

    def _segmented(self, x: torch.Tensor, rows: MixedRows, drop: bool = True) -> torch.Tensor:
        """Rows sorted by adapter, then one grouped matmul per factor over the distinct adapters' A/B
        (``torch._grouped_mm``, the segmented GEMM of Punica's SGMV): reads each distinct adapter's
        weights once instead of copying them per row. Only the rows' order is copied. The CUDA path for
        many adapters (grouped GEMM kernels); on CPU ``gather`` is faster (README "Routing algorithm").
        Training falls back to ``gather`` (gradients must reach the used adapters' parameter views)."""
        align = max(1, 16 // x.element_size())  # grouped GEMMs need every stride a multiple of 16 bytes
        if (
            (drop and self.training)
            or self._rows_need_grad(rows)
            or self.in_features % align
            or self.out_features % align
        ):
            return self._gathered(x, rows, drop=drop)
        seg = rows.segments()
        Bsz = x.shape[0]
        x3 = x.reshape(Bsz, -1, self.in_features)
        T = x3.shape[1]
        xs = x3.index_select(0, seg.order).reshape(-1, self.in_features)  # (B·T, in), grouped by slot
        A_u = self.stack_A.index_select(0, seg.slots).to(x.dtype)  # (G, R, in)
        B_u = self.stack_B.index_select(0, seg.slots).to(x.dtype)  # (G, out, R)
        A_u, B_u = _common_rank(A_u, B_u, 1, 2)
        if A_u.shape[1] % align:  # zero rank rows/columns: the same update, aligned strides
            pad = align - A_u.shape[1] % align
            A_u, B_u = F.pad(A_u, (0, 0, 0, pad)), F.pad(B_u, (0, pad))
        offs = seg.offsets(T)
        h = _grouped_mm(xs, A_u.transpose(1, 2), offs=offs)  # (B·T, R)
        s_rows = seg.per_token(self.scales.index_select(0, seg.slots).to(x.dtype), T)  # (B·T,)
        delta = _grouped_mm(h * s_rows.unsqueeze(1), B_u.transpose(1, 2), offs=offs)  # (B·T, out)
        delta = delta.view(Bsz, T, self.out_features).index_select(0, seg.inverse)
        return delta.reshape(*x.shape[:-1], self.out_features)

    def _grouped(self, x: torch.Tensor, rows: MixedRows, drop: bool = True) -> torch.Tensor:
        """One matmul per distinct adapter over its rows (index, compute, scatter back; ``drop``: apply
        each adapter's LoRA dropout in training)."""
        delta = x.new_zeros(*x.shape[:-1], self.out_features)
        for s in rows.uniq:
            n = self._name_of_slot.get(s)
            if n is None:
                continue
            sel = (rows.idx == s).nonzero(as_tuple=True)[0]
            xs = self._dropout(x.index_select(0, sel), self.dropout[n] if drop else 0.0)
            h = F.linear(xs, self.lora_A[n].to(x.dtype))
            delta.index_copy_(0, sel, F.linear(h, self.lora_B[n].to(x.dtype)) * self.scaling[n])
        return delta

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.slots)}, merged={self.merged}"


def _routes(sel: LoraSelection, slots: set[int]) -> bool:
    """Whether a selection routes some row to one of ``slots``."""
    if isinstance(sel, int):
        return sel in slots
    if isinstance(sel, MixedRows):
        return not slots.isdisjoint(sel.uniq)
    if isinstance(sel, tuple):
        return any(_routes(level, slots) for level in sel)
    return False  # a StaticSlot: never a DoRA slot


def _common_rank(
    A: torch.Tensor, B: torch.Tensor, a_dim: int, b_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B cut to their common rank (a no-op unless another thread resized the stacks between the two
    reads: attaching an adapter of a larger rank replaces stack_A, stack_B and scales one after the other).
    Both the old and the new stacks hold every existing slot's values, with zeros past its rank, so the
    common rank gives exactly the same update."""
    ra, rb = A.shape[a_dim], B.shape[b_dim]
    if ra == rb:  # always, but for that moment: no extra ops on the hot path
        return A, B
    r = min(ra, rb)
    return A.narrow(a_dim, 0, r), B.narrow(b_dim, 0, r)
