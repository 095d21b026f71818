"""AdaLoRA (Zhang et al. 2023) as a method: PEFT's SVD form per targeted Linear/Conv1D, routed per row,
with PEFT's rank allocation driven by the trainer (:meth:`Method.after_step`) and its orthogonality
regulariser (:meth:`Method.training_loss`).

Each layer holds, per adapter, ``lora_A`` (r, in), ``lora_E`` (r, 1) and ``lora_B`` (out, r) in
``nn.ParameterDict``s keyed by adapter name, as PEFT's ``AdaLoraLayer`` does, and adds
``(x·(A⊙E)ᵀ·Bᵀ)·scaling/(ranknum + 1e-5)`` (PEFT's exact order of operations). Rank allocation masks
triplets by zeroing E entries; layers keep ``init_r`` rows throughout.

Saved as PEFT saves it: ``base_model.model.<module path>.lora_A`` / ``lora_E`` / ``lora_B``; once ranks
have been allocated, only the kept triplets (E ≠ 0), with PEFT's ``rank_pattern`` (the kept mask per
module) in the config, so ``PeftModel.from_pretrained`` resizes exactly as for its own folders.
For serving, :meth:`AdaLoraMethod.to_lora` folds an adapter to a plain LoRA with per-module ranks
(``AdapterModel.attach_folded`` / ``files.folder.save_folded`` attach or save it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from ..core.config import adapter_dtype_for
from ..core.module_paths import PEFT_PREFIX
from ..core.routing import MixedRows, Route
from .adalora_config import AdaLoraConfig, schedule_problem
from .base import Factors, KeyMap
from .lora_config import LoraConfig
from .wrapped import MergingLayerMethod, innermost, target_paths

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "AdaLoraMethod"]

Selection = int | MixedRows | tuple[int | MixedRows, ...]
_KEY = re.compile(r"^(.+)\.lora_([AEB])$")


def _module_of(key: str) -> str | None:
    """The module part of a saved key ``<module>.lora_A`` / ``.lora_E`` / ``.lora_B`` (None for other keys)."""
    m = _KEY.match(key)
    return m[1] if m else None


class AdaLoraLayer(nn.Module):
    """Wraps one layer (the outermost module at the target's path); adds each row's adapter update."""

    _route: Route

    def __init__(self, base_layer: nn.Module, route: Route, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.base_layer = base_layer
        w = cast(torch.Tensor, innermost(base_layer).weight)
        self.fan_in_fan_out = not isinstance(innermost(base_layer), nn.Linear)  # Conv1D stores (in, out)
        self.in_features, self.out_features = (
            (w.shape[0], w.shape[1]) if self.fan_in_fan_out else w.shape[::-1]
        )
        self.dtype = dtype or adapter_dtype_for(w.dtype)
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


class _OneAdapter:
    """One adapter's A/E/B under PEFT's parameter names (``<path>.lora_A.<name>``): the ``model`` handed to
    PEFT's ``RankAllocator``, which only calls ``named_parameters()``. The whole model would not do: the
    allocator finds parameters by substring (any ``lora_`` parameter whose name contains the adapter's
    name, so LoRA's ``lora_A.<name>`` and other adapters whose names contain this one would be counted)."""

    def __init__(self, method: AdaLoraMethod, name: str) -> None:
        self.method, self.name = method, name

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for path in self.method.paths[self.name]:
            layer = self.method.layers[path]
            for kind in ("lora_A", "lora_E", "lora_B"):
                yield f"{path}.{kind}.{self.name}", cast(nn.Parameter, getattr(layer, kind)[self.name])


class AdaLoraMethod(MergingLayerMethod):
    """Owns every :class:`AdaLoraLayer` of one model. Selection: an int slot (every row), :class:`MixedRows`,
    or a tuple of those (a stack: the levels' updates add)."""

    name = "adalora"
    config_class = AdaLoraConfig
    peft_config_types = ("AdaLoraConfig",)

    def __init__(self, model: nn.Module, route: Route, *, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(model, route, adapter_dtype=adapter_dtype)
        self.layers: dict[str, AdaLoraLayer] = {}
        self.configs: dict[str, AdaLoraConfig] = {}
        self.allocators: dict[str, Any] = {}  # name -> PEFT's RankAllocator, made at the first step
        self.patterns: dict[str, dict[str, list[bool]]] = {}  # the final allocation's masks (PEFT's names)
        self.allocated: set[str] = set()  # adapters whose ranks were allocated (saved with a rank_pattern)

    # ---------------------------------------------------------------- targets
    def _match(self, config: AdaLoraConfig) -> list[str]:
        from peft.tuners.tuners_utils import check_target_module_exists
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as DEFAULTS

        targets: Any = config.targets
        if targets is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            targets = DEFAULTS.get(model_type) if model_type else None
            if targets is None:
                raise ValueError(
                    f"AdaLoraConfig.targets is None and PEFT has no AdaLoRA default for model type {model_type!r}: "
                    "pass targets=(...) with module-name suffixes such as ('q_proj', 'v_proj')."
                )
        peft_cfg = config.to_peft(target_modules=targets)
        paths = target_paths(
            self.model, lambda n: bool(check_target_module_exists(peft_cfg, n)), AdaLoraLayer
        )
        if not paths:
            wanted = [targets] if isinstance(targets, str) else list(targets)
            raise ValueError(
                f"AdaLoRA targets {wanted} match no Linear/Conv1D module of {type(self.model).__name__}; "
                "pass module-name suffixes of its Linear layers (e.g. ('query', 'value'))"
            )
        return paths

    def _wrap(self, path: str) -> AdaLoraLayer:
        return self.wrap(path, lambda m: AdaLoraLayer(m, self.route, self.adapter_dtype))

    # ---------------------------------------------------------------- adapters
    @override
    def add(self, name: str, config: AdaLoraConfig) -> None:
        paths = self._match(config)
        slot = self.next_slot()
        for path in paths:
            self._wrap(path).add(name, slot, config.init_r, config.scaling, config.dropout, config.init)
        self.slot[name], self.paths[name], self.configs[name] = slot, paths, config

    @override
    def remove(self, name: str) -> None:
        for path in self.paths.pop(name):
            self.layers[path].remove(name)
        del self.slot[name], self.configs[name]
        self.allocators.pop(name, None)
        self.patterns.pop(name, None)
        self.allocated.discard(name)

    @override
    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """``{"<module path>.adalora_A" / "_E" / "_B": tensor}`` for every targeted module."""
        return {
            f"{path}.adalora_{kind[-1]}": cast(nn.Parameter, getattr(self.layers[path], kind)[name])
            for path in self.paths[name]
            for kind in ("lora_A", "lora_E", "lora_B")
        }

    @override
    def owns_parameter(self, qualified_name: str, parameter: nn.Parameter) -> bool:
        return re.search(r"\.lora_[AEB]\.", qualified_name) is not None

    # ---------------------------------------------------------------- training
    def _trained(self, names: Sequence[str]) -> list[str]:
        return [
            n
            for n in dict.fromkeys(names)
            if n in self.slot and self.layers[self.paths[n][0]].lora_E[n].requires_grad
        ]

    @override
    def training_loss(self, names: Sequence[str]) -> torch.Tensor | None:
        """``orth_reg_weight · mean over A and B of ‖AAᵀ − I‖_F / ‖BᵀB − I‖_F`` per adapter, summed: PEFT's
        regulariser, written here because PEFT computes it inside ``AdaLoraModel.forward`` (a PEFT model's)."""
        terms = []
        for name in self._trained(names):
            weight = self.configs[name].orth_reg_weight
            if weight == 0:
                continue
            norms = []
            for path in self.paths[name]:
                A, B = self.layers[path].lora_A[name], self.layers[path].lora_B[name]
                for cov in (A @ A.T, B.T @ B):  # (r, r)
                    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                    norms.append(torch.norm(cov - eye, p="fro"))
            terms.append(weight * torch.stack(norms).mean())
        return torch.stack(terms).sum() if terms else None

    @override
    def after_step(self, names: Sequence[str], global_step: int, total_steps: int) -> None:
        """Rank allocation of each trained adapter (PEFT's ``update_and_allocate``): importance from this
        step's gradients, masking on the schedule, the final budget at ``total_step - tfinal``, then that
        mask re-applied. An adapter that got no gradient this step (no rows of it in the batch) keeps its
        scores; it is still masked on schedule once it has scores."""
        for name in self._trained(names):
            self._allocate(name, global_step, total_steps)

    def _allocator(self, name: str, total_steps: int) -> Any:
        if name not in self.allocators:
            from peft.tuners.adalora.layer import RankAllocator

            config = self.configs[name]
            total = config.total_step or total_steps
            problems = schedule_problem(config.tinit, config.tfinal, total)
            if problems:
                raise ValueError(f"AdaLoRA adapter {name!r}: {problems[0]}")
            self.allocators[name] = RankAllocator(
                _OneAdapter(self, name), config.to_peft(total_step=total), name
            )
        return self.allocators[name]

    @torch.no_grad()
    def _allocate(self, name: str, step: int, total_steps: int) -> None:
        # PEFT's AdaLoraModel.update_and_allocate dispatches on the step like this; it is a method of a PEFT
        # model, so the few lines are written here, around PEFT's RankAllocator that does the work
        alloc = self._allocator(name, total_steps)
        view = _OneAdapter(self, name)
        cfg = alloc.peft_config
        end = cfg.total_step - cfg.tfinal
        graded = all(p.grad is not None for _, p in view.named_parameters())
        if step < end:
            if graded:
                pattern = alloc.update_and_allocate(view, step)[1]
            elif alloc.exp_avg_ipt:  # scores from earlier steps: mask on schedule all the same
                budget, due = alloc.budget_schedule(step)
                pattern = alloc.mask_to_budget(view, budget) if due else None
            else:
                return
            if pattern:
                self.allocated.add(name)
        elif step == end and alloc.exp_avg_ipt:
            self.patterns[name] = alloc.update_and_allocate(view, step, force_mask=True)[1]
            self.allocated.add(name)
            alloc.reset_ipt()
        elif step > end and name in self.patterns:
            alloc.mask_using_rank_pattern(view, self.patterns[name])

    def kept_ranks(self, name: str) -> dict[str, int]:
        """``{module path: triplets kept}`` (E entries that are not zero) of adapter ``name``."""
        return {p: int((self.layers[p].lora_E[name] != 0).sum()) for p in self.paths[name]}

    # ---------------------------------------------------------------- weight updates
    @override
    def factors(self, name: str, state: Mapping[str, torch.Tensor] | None = None) -> Factors:
        """``{module path: (A⊙E, B, scaling/(ranknum + 1e-5))}`` (A⊙E is a product, not a view)."""
        out: Factors = {}
        for path in self.paths[name]:
            layer = self.layers[path]
            A, E, B = (
                state[f"{path}.adalora_{k}"] if state is not None else getattr(layer, f"lora_{k}")[name]
                for k in "AEB"
            )
            out[path] = ((A * E).detach(), B.detach(), layer.scaling[name] / layer.ranknum[name])
        return out

    @override
    def settles_at(self, name: str, total_steps: int) -> int:
        """The step of the final allocation (``total_step - tfinal``): before it the adapter is over budget."""
        config = self.configs[name]
        return (config.total_step or total_steps) - config.tfinal

    @override
    def folded(self, name: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """What serving uses: :meth:`to_lora`."""
        return self.to_lora(name)

    def to_lora(self, name: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """``name`` as a plain LoRA computing the same update: per module only the kept triplets (E ≠ 0),
        ``A' = (A⊙E)[kept]`` (k, in), ``B' = B[:, kept]`` (out, k), rank k, and alpha chosen so that LoRA's
        ``alpha/r`` is AdaLoRA's ``scaling/(ranknum + 1e-5)``; modules that keep nothing are left out.

        Returns:
            ``(LoraConfig, state)``: ``state`` keyed as LoRA's ``adapter_params`` (``<path>.lora_A`` / ``.lora_B``).

        Raises:
            ValueError: no module keeps a triplet (the update is zero: there is no LoRA to make).
        """
        ranks, scales, state = {}, {}, {}
        for path, (AE, B, scale) in self.factors(name).items():
            kept = (self.layers[path].lora_E[name].detach() != 0).view(-1)
            if int(kept.sum()) == 0:
                continue
            ranks[path], scales[path] = int(kept.sum()), scale
            state[f"{path}.lora_A"], state[f"{path}.lora_B"] = AE[kept].clone(), B[:, kept].clone()
        if not ranks:
            raise ValueError(
                f"AdaLoRA adapter {name!r} keeps no triplet in any module (every E entry is zero, so its update is "
                "zero): train it first (E starts at zero), or there is no LoRA to fold"
            )
        r = max(ranks.values())
        first = next(p for p in ranks if ranks[p] == r)
        config = LoraConfig(
            r=r,
            alpha=scales[first] * r,
            targets=tuple(ranks),
            dropout=self.configs[name].dropout,
            rank_pattern={p: k for p, k in ranks.items() if k != r},
            # alpha/r_module = scale per module (the scales are one value unless adapters were loaded oddly)
            alpha_pattern={
                p: scales[p] * k for p, k in ranks.items() if k != r or scales[p] != scales[first]
            },
        )
        return config, state

    # ---------------------------------------------------------------- merging into the base
    # ---------------------------------------------------------------- files
    @override
    @classmethod
    def owns_peft_key(cls, key: str) -> bool:
        return _KEY.match(key) is not None

    @override
    @classmethod
    def check_peft_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """Triplets A (r, in), E (r, 1), B (out, r) of one rank per module (r may be 0: a module that kept nothing)."""
        modules: dict[str, dict[str, torch.Tensor]] = {}
        problems = []
        for key, t in tensors.items():
            m = _KEY.match(key)
            if m is None:
                problems.append(f"unexpected key {key!r} (expected <module>.lora_A / .lora_E / .lora_B)")
            else:
                modules.setdefault(m[1], {})[m[2]] = t
        for module, parts in sorted(modules.items()):
            if set(parts) != {"A", "E", "B"}:
                problems.append(
                    f"{module} has lora_{'/'.join(sorted(parts))} but not all of lora_A, lora_E, lora_B"
                )
            elif not (
                parts["A"].dim() == parts["B"].dim() == 2
                and tuple(parts["E"].shape) == (parts["A"].shape[0], 1) == (parts["B"].shape[1], 1)
            ):
                shapes = {k: tuple(v.shape) for k, v in parts.items()}
                problems.append(
                    f"{module}: shapes {shapes} are not A (r, in), E (r, 1), B (out, r) with one r"
                )
        return problems

    @override
    def loading_config(self, config: AdaLoraConfig) -> AdaLoraConfig:
        return dataclasses.replace(config, init="zeros")  # values are copied in right after

    def _kept_masks(self, name: str) -> dict[str, torch.Tensor] | None:
        """Per module the triplets to save (E ≠ 0) once ranks were allocated; None: save every triplet."""
        if name not in self.allocated:
            return None
        return {p: (self.layers[p].lora_E[name].detach() != 0).view(-1) for p in self.paths[name]}

    @override
    def peft_config(self, name: str, config: AdaLoraConfig, *, task_type: str, base_model: str | None) -> Any:
        alloc = self.allocators.get(name)
        masks = self._kept_masks(name)
        config = dataclasses.replace(
            config, rank_pattern={p: tuple(m.tolist()) for p, m in masks.items()} if masks is not None else {}
        )
        peft_cfg = config.to_peft(
            total_step=alloc.peft_config.total_step if alloc is not None else None,
            task_type=task_type,
            base_model_name_or_path=base_model,
        )
        if any(self.layers[p].fan_in_fan_out for p in self.paths[name]):
            peft_cfg.fan_in_fan_out = True  # what PEFT sets for transformers' Conv1D layers
        return peft_cfg

    @override
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        masks = self._kept_masks(name)
        out = {}
        for path in self.paths[name]:
            layer = self.layers[path]
            keep = masks[path] if masks is not None else slice(None)
            for kind, t in (
                ("A", layer.lora_A[name][keep]),
                ("E", layer.lora_E[name][keep]),
                ("B", layer.lora_B[name][:, keep]),
            ):
                out[f"{PEFT_PREFIX}{path}.lora_{kind}"] = t.detach().contiguous().clone()
        return out

    @override
    @torch.no_grad()
    def load_peft_state(self, name: str, state: Mapping[str, torch.Tensor], key_maps: KeyMap) -> list[str]:
        """Copy a saved state in; a module saved with a ``rank_pattern`` mask has its kept triplets put back
        at their places (the others zero), so the adapter computes exactly what was saved."""
        mine = set(self.paths[name])
        saved_paths = {m for k in state if (m := _module_of(k)) is not None}
        best: dict[str, str] = {}
        for _, fn in key_maps:
            hits = {
                s: p for s in saved_paths if (p := fn(s.removeprefix(PEFT_PREFIX))) is not None and p in mine
            }
            if len(hits) > len(best):
                best = hits
        pattern = self.configs[name].rank_pattern
        masks: dict[str, tuple[bool, ...]] = {}
        for _, fn in key_maps:  # the masks' keys are module paths of the model PEFT wrapped
            masks.update(
                {
                    p: m
                    for k, m in pattern.items()
                    if (p := fn(k)) is not None and p in mine and p not in masks
                }
            )
        problems = [f"unexpected key {k}" for k in state if _module_of(k) not in best][:8]
        missing = sorted(mine - set(best.values()))
        if missing:
            problems.append(f"missing keys: {[f'{p}.lora_A/E/B' for p in missing[:8]]}")
        unknown = sorted(set(pattern) - {k for k in pattern if any(fn(k) in mine for _, fn in key_maps)})
        if unknown:
            problems.append(f"rank_pattern names modules this adapter does not target: {unknown[:8]}")
        plan = []
        for saved, path in best.items():
            layer = self.layers[path]
            A, E, B = (state[f"{saved}.lora_{k}"] for k in "AEB")
            r = layer.lora_A[name].shape[0]
            mask = masks.get(path)
            keep = (
                torch.tensor(mask, device=A.device) if mask is not None else torch.ones(r, dtype=torch.bool)
            )
            want = (int(keep.sum()), layer.in_features, layer.out_features)
            if len(keep) != r or (A.shape[0], A.shape[1], B.shape[0]) != want:
                problems.append(
                    f"{saved}: lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)} but the adapter expects rank "
                    f"{want[0]} of {r} (rank_pattern), in {want[1]}, out {want[2]}"
                )
                continue
            plan.append((layer, keep, A, E, B))
        if not problems:
            for layer, keep, A, E, B in plan:
                for param, value in ((layer.lora_A[name], A), (layer.lora_E[name], E)):
                    param.zero_()
                    param[keep.to(param.device)] = value.to(param.device, param.dtype)
                layer.lora_B[name].zero_()
                layer.lora_B[name][:, keep.to(B.device)] = B.to(layer.lora_B[name].dtype)
            if pattern:
                self.allocated.add(name)
        return problems
