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
from torch import nn
from typing_extensions import override

from ..core.module_paths import PEFT_PREFIX
from ..core.routing import Route
from .adalora_config import AdaLoraConfig, schedule_problem
from .adalora_layer import AdaLoraLayer
from .base import Factors, KeyMap
from .lora_config import LoraConfig
from .wrapped import MergingLayerMethod, target_paths

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "AdaLoraMethod"]

_KEY = re.compile(r"^(.+)\.lora_([AEB])$")


def _module_of(key: str) -> str | None:
    """The module part of a saved key ``<module>.lora_A`` / ``.lora_E`` / ``.lora_B`` (None for other keys)."""
    m = _KEY.match(key)
    return m[1] if m else None


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
