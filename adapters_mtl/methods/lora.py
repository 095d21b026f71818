"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024, ``LoraConfig(use_dora=True)``) as a method: target
matching, slots, per-row selection, merging, and PEFT's saved layout
(``base_model.model.<module path>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r), and for DoRA
``...lora_magnitude_vector`` (out,)).

PEFT's own ``get_peft_model_state_dict`` needs a ``PeftModel``; our layers are not PEFT's, so the key
mapping is written here (a few lines, no copy of PEFT code).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn
from typing_extensions import override

from ..core.module_paths import PEFT_PREFIX, module_list
from ..core.quantize import refuse_merge
from ..core.routing import MixedRows, Route, StaticSlot, slot_selection
from .base import Factors, KeyMap, Method
from .lora_config import LoraConfig
from .lora_layer import LoraLayer, is_lora_target_type

__all__ = ["LoraMethod"]


class LoraMethod(Method):
    """Owns every :class:`LoraLayer` of one model: target matching, wrapping, slots and routing.

    Slots are global to the model (adapter ``n`` has the same slot in every layer), so a batch's
    routing is computed once per call, not once per layer. Selection: an int (one slot for every row;
    0 = none), :class:`MixedRows`, or a tuple of those (a stack: one per level).

    DoRA adapters share the slots and the routing; in a stack every level's update is relative to the
    frozen base weight (a DoRA level adds ``m/‖W+s·B·A‖·(W+s·B·A) − W``), and a stack holds at most one
    DoRA adapter. They have no low-rank ``factors`` (merging several adapters into one refuses them) and
    keep the ordinary path under static routing.
    """

    name = "lora"
    config_class = LoraConfig
    peft_config_types = ("LoraConfig",)
    idle_selection = 0

    def __init__(self, model: nn.Module, route: Route, *, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(model, route, adapter_dtype=adapter_dtype)
        self.layers: dict[str, LoraLayer] = {}
        self.slot: dict[str, int] = {}
        self.targets: dict[str, list[str]] = {}
        self._actual: dict[str, str] = {}  # target path -> where the wrapped module really is
        # {what a config targets: (every module of the model when matched, the matched paths)}: see _match
        self._matched: dict[tuple[Any, ...], tuple[list[nn.Module], list[str]]] = {}
        self._free: list[int] = []
        self._next = 1  # slot 0 = no LoRA
        self._merged: str | None = None
        self.dora: set[str] = set()  # the DoRA adapters (LoraConfig(use_dora=True))
        self._dora_slots: set[int] = set()  # and their slots

    # ---------------------------------------------------------------- targets
    def _candidates(self) -> dict[str, nn.Module]:
        """Targetable modules by the path users name them with. A layer another method has wrapped (its
        wrapper keeps the original as ``base_layer``, as PEFT's do) is named by the wrapper's path, and
        LoRA wraps the original inside it (``self._actual`` keeps where)."""
        out: dict[str, nn.Module] = {}
        modules = dict(self.model.named_modules())
        for path, module in modules.items():
            if not isinstance(module, LoraLayer) and not is_lora_target_type(module):
                continue
            name = path
            while name.endswith(".base_layer"):
                name = name[: -len(".base_layer")]
                if isinstance(modules.get(name), LoraLayer):
                    break  # LoRA's own wrapped original: the LoraLayer is the candidate
            else:
                out[name] = module
                self._actual[name] = path
        return out

    def _match(self, config: LoraConfig) -> list[str]:
        """The paths ``config`` targets. Cached per target spec while the model's modules stay the same
        objects (the key holds them, so a replaced module's id cannot be reused): a second adapter with the
        same targets lists the modules (~1 ms on SmolLM2) instead of matching every one again (~5 ms)."""
        spec = (config.targets, config.exclude, config.layers_to_transform)
        modules = module_list(self.model)
        hit = self._matched.get(spec)
        if hit is not None and hit[0] == modules:
            return list(hit[1])
        matched = self._match_uncached(config)
        self._matched[spec] = (modules, matched)
        return list(matched)

    def _match_uncached(self, config: LoraConfig) -> list[str]:
        from peft.tuners.tuners_utils import check_target_module_exists
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        targets: list[str] | tuple[str, ...] | str | None = config.targets
        if targets is None:
            model_type = getattr(self.model.config, "model_type", None)
            # peft's values are lists of module names or one regex (a str); mypy infers Sequence[str]
            mapping = cast("dict[str, list[str] | str]", TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
            targets = mapping.get(model_type) if model_type is not None else None
            if targets is None:
                raise ValueError(
                    f"LoraConfig.targets is None and there is no default for model type {model_type!r}: "
                    "pass targets=(...) with module-name suffixes such as ('q_proj', 'v_proj')."
                )
        candidates = self._candidates()
        if targets == "all-linear":  # PEFT's shorthand: every Linear/Conv1D except the output layer
            model: Any = self.model  # a transformers model (get_output_embeddings) or a plain module
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            targets = [  # a bare encoder (BertModel) has no output layer: every Linear is a target
                p
                for p, m in candidates.items()
                if out is None or (m is not out and getattr(m, "base_layer", None) is not out)
            ]
        peft_cfg = config.to_peft(target_modules=targets)
        matched = [p for p in candidates if check_target_module_exists(peft_cfg, p) and not _excluded(p)]
        if not matched:
            import difflib

            suffixes = sorted({p.rsplit(".", 1)[-1] for p in candidates})
            wanted = [targets] if isinstance(targets, str) else list(targets)
            near = sorted(
                {m for t in wanted for m in difflib.get_close_matches(t, suffixes, n=3, cutoff=0.5)}
            )
            raise ValueError(
                f"LoRA targets {wanted} match no Linear/Conv1D module of {type(self.model).__name__}. "
                f"Near matches: {near or 'none'}. Module names that can be targeted: {suffixes}."
            )
        return matched

    def _wrap(self, path: str) -> LoraLayer:
        if path in self.layers:
            return self.layers[path]
        parent_path, _, child = self._actual.get(path, path).rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        layer = LoraLayer(getattr(parent, child), self.route, self.adapter_dtype)
        setattr(parent, child, layer)
        self.layers[path] = layer
        return layer

    # ---------------------------------------------------------------- adapters
    @override
    def add(self, name: str, config: LoraConfig) -> None:
        from peft.utils.other import get_pattern_key

        paths = self._match(config)
        wrapped = len(self.layers)
        slot = self._free.pop() if self._free else self._next
        self._next = max(self._next, slot + 1)
        for path in paths:
            r = config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), path), config.r)
            alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), path), config.alpha)
            self._wrap(path).add(
                name, slot, r, config.scaling(r, alpha), config.dropout, config.init, config.use_dora
            )
        # every layer's stacks span every slot (zeros where the adapter has no weights), so a mixed
        # batch can gather any row's slot in any layer
        for layer in self.layers.values():
            layer.grow(self._next, 1)
        if len(self.layers) != wrapped:  # new wrappers changed the modules: the match holds for the new ones
            self._matched[(config.targets, config.exclude, config.layers_to_transform)] = (
                module_list(self.model),
                paths,
            )
        self.slot[name], self.targets[name] = slot, paths
        if config.use_dora:
            self.dora.add(name)
            self._dora_slots.add(slot)

    @override
    def remove(self, name: str) -> None:
        for path in self.targets.pop(name):
            self.layers[path].remove(name)
        slot = self.slot.pop(name)
        self._free.append(slot)
        self.dora.discard(name)
        self._dora_slots.discard(slot)

    @override
    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """``{"<module path>.lora_A": A, "<module path>.lora_B": B}`` for every targeted module, and
        ``"<module path>.lora_magnitude_vector": m`` for a DoRA adapter."""
        out: dict[str, nn.Parameter] = {}
        for path in self.targets[name]:
            for key, p in self.layers[path].adapter_params(name).items():
                out[f"{path}.{key}"] = p
        return out

    @override
    def selection(
        self, names: Sequence[str | tuple[str, ...] | None]
    ) -> int | MixedRows | tuple[int | MixedRows, ...]:
        """Turn one entry per row (a name, None, or a tuple = a stack) into this method's routing.

        A stack becomes one level per position (level k holds each row's k-th LoRA adapter); layers add
        the levels' updates, so ("shared", "news") computes W·x + Δshared·x + Δnews·x (a DoRA adapter's
        Δ is relative to the base weight: m/‖W+s·B·A‖·(W+s·B·A) − W).

        Raises:
            ValueError: a stack holds more than one DoRA adapter.
        """
        if self.dora:
            self._check_dora_stacks(names)
        return slot_selection(names, self.slot, self._device)

    def _check_dora_stacks(self, names: Sequence[str | tuple[str, ...] | None]) -> None:
        # Two DoRA levels would each rescale the base weight's output channels; whether they compose
        # relative to the base or one after the other has no agreed answer, so refuse the ambiguity.
        bad = sorted(
            {e for e in names if isinstance(e, tuple) and sum(n in self.dora for n in e) > 1}, key=str
        )
        if bad:
            raise ValueError(
                f"stack(s) {bad} hold more than one DoRA adapter (LoraConfig(use_dora=True)); a stack may hold "
                "at most one DoRA adapter (each rescales the base weight's output channels, and two "
                "rescalings of one weight have no single meaning). Stack one DoRA adapter with plain LoRA "
                "adapters, or route the DoRA adapters to different rows."
            )

    def _device(self) -> torch.device:
        layer = next(iter(self.layers.values()), None)
        return layer.stack_A.device if layer is not None else torch.device("cpu")

    @override
    def merge(self, name: str, keep_original: bool = True) -> None:
        refuse_merge(((p, self.layers[p].base_layer) for p in self.targets[name]), name)  # before any layer
        if not keep_original:
            tied = [
                p
                for p in self.targets[name]
                if self._is_tied(cast(torch.Tensor, self.layers[p].base_layer.weight))
            ]
            if tied:
                raise ValueError(
                    f"cannot merge {name!r} in place: {tied} share their weight with another module "
                    "(tied embeddings); use merge(name, keep_original=True)."
                )
        for path in self.targets[name]:
            self.layers[path].merge(name, keep_original)
        self._merged = name

    def _is_tied(self, weight: torch.Tensor) -> bool:
        ptr = weight.data_ptr()
        return (
            sum(1 for _, p in self.model.named_parameters(remove_duplicate=False) if p.data_ptr() == ptr) > 1
        )

    @override
    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()
        self._merged = None

    @override
    def compact(self) -> None:
        """Free the stacks' spare capacity (they grow by doubling, so adding an adapter is amortised O(1))."""
        while self._next > 1 and self._next - 1 in self._free:  # trailing free slots are given back
            self._next -= 1
            self._free.remove(self._next)
        for layer in self.layers.values():
            layer.fit(self._next)

    @override
    def merged(self) -> str | None:
        """The merged adapter (tracked here: read on every routed call, so no walk over layers)."""
        return self._merged

    @override
    def static_selection(self, selection: object, slot: StaticSlot, merged: bool) -> object:
        """One slot for every row held in ``slot`` (written in place: a compiled model reads it as data);
        stacks, mixed rows and a DoRA adapter keep the ordinary path (a DoRA adapter rescales the output
        channels with a per-adapter norm, which the full-rank static path does not compute; a compiled
        model then recompiles when switching to or from it). A merged DoRA adapter is in the base weights,
        so it takes the static path's empty slot like any merged adapter."""
        if not isinstance(selection, int):
            return selection
        if not merged and selection in self._dora_slots:
            return selection
        slot.slot.fill_(0 if merged else selection)
        return slot

    @override
    def factors(self, name: str, state: Mapping[str, torch.Tensor] | None = None) -> Factors:
        """``{module path: (A, B, scale)}``; ``state`` keys as :meth:`adapter_params`.

        Raises:
            ValueError: ``name`` is a DoRA adapter: its update m/‖W+s·B·A‖·(W+s·B·A) − W is not s·B·A.
        """
        if name in self.dora:
            raise ValueError(
                f"adapter {name!r} is a DoRA adapter (LoraConfig(use_dora=True)): its weight update "
                "m/‖W+s·B·A‖·(W+s·B·A) − W rescales the base weight's output channels, so it has no low-rank "
                "factors (A, B, scale) to merge with other adapters, fold a stack into, or compose. Merge it "
                f"into the base weights alone with model.merge({name!r}), or train a plain LoRA adapter "
                "(use_dora=False) to combine it with others."
            )
        out: Factors = {}
        for path in self.targets[name]:
            layer = self.layers[path]
            A = state[f"{path}.lora_A"] if state is not None else layer.lora_A[name]
            B = state[f"{path}.lora_B"] if state is not None else layer.lora_B[name]
            out[path] = (A.detach(), B.detach(), float(layer.scaling[name]))
        return out

    @override
    def owns_parameter(self, qualified_name: str, parameter: nn.Parameter) -> bool:
        return ".lora_" in qualified_name

    # ---------------------------------------------------------------- files
    @override
    @classmethod
    def config_from_peft(cls, peft_config: Any, *, saved: bool = False) -> LoraConfig:
        return LoraConfig.from_peft(peft_config)

    @override
    @classmethod
    def owns_peft_key(cls, key: str) -> bool:
        return ".lora_" in key

    @override
    @classmethod
    def check_peft_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """LoRA factors come in (A, B) pairs of 2-D tensors whose ranks agree, and a DoRA magnitude vector
        is 1-D with one value per output channel of its module's B (the base checks the rest)."""
        embedding = sorted(k for k in tensors if re.search(r"\.lora_embedding_[AB](\.weight)?$", k))
        if embedding:
            return [
                f"LoRA on embedding layers ({embedding[0]}, ...: PEFT's lora_embedding_A/B, e.g. for new "
                "tokens) is not supported by adapters_mtl yet; train the adapter without the embedding layer "
                "in target_modules, or serve it with PEFT"
            ]
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        magnitudes: dict[str, torch.Tensor] = {}
        problems: list[str] = []
        for key, t in tensors.items():
            m = re.match(r"^(.+)\.lora_([AB])\.weight$", key)
            if m:
                pairs.setdefault(m[1], {})[m[2]] = t
            elif m := re.match(rf"^(.+)\.{_MAGNITUDE}(\.weight)?$", key):
                magnitudes[m[1]] = t
            else:
                problems.append(
                    f"unexpected key {key!r} (expected <module>.lora_A.weight / .lora_B.weight, or DoRA's "
                    f"<module>.{_MAGNITUDE})"
                )
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                problems.append(f"{module} has lora_{''.join(ab)} but not its partner")
            elif ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["A"].shape[0] != ab["B"].shape[1]:
                problems.append(
                    f"{module}: lora_A {tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)} are not "
                    "(r, in) and (out, r) with the same r"
                )
        for module, mag in sorted(magnitudes.items()):
            B = pairs.get(module, {}).get("B")
            if B is None:
                problems.append(f"{module} has a DoRA {_MAGNITUDE} but no lora_A/lora_B pair")
            elif mag.dim() != 1 or B.dim() != 2 or mag.shape[0] != B.shape[0]:
                problems.append(
                    f"{module}: {_MAGNITUDE} {tuple(mag.shape)} is not (out,) with out = lora_B's "
                    f"{B.shape[0] if B.dim() == 2 else '?'} output channels"
                )
        return problems

    @override
    def loading_config(self, config: LoraConfig) -> LoraConfig:
        return dataclasses.replace(config, init="zeros")  # values are copied in right after

    @override
    def peft_config(self, name: str, config: LoraConfig, *, task_type: str, base_model: str | None) -> Any:
        return config.to_peft(target_modules=None, task_type=task_type, base_model_name_or_path=base_model)

    @override
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        # PEFT saves A and B as <path>.lora_A.weight, DoRA's magnitude as <path>.lora_magnitude_vector
        out: dict[str, torch.Tensor] = {}
        for key, p in self.adapter_params(name).items():
            suffix = "" if key.endswith(_MAGNITUDE) else ".weight"
            out[f"{PEFT_PREFIX}{key}{suffix}"] = p.detach().contiguous().clone()
        return out

    @override
    @torch.no_grad()
    def load_peft_state(self, name: str, state: Mapping[str, torch.Tensor], key_maps: KeyMap) -> list[str]:
        params = self.adapter_params(name)
        names, problems = _native_names(key_maps, list(state), set(params))
        plan: list[tuple[nn.Parameter, torch.Tensor]] = []
        for key, tensor in state.items():
            if key not in names:
                continue  # reported by _native_names
            target = params[names[key]]
            if tuple(target.shape) != tuple(tensor.shape):
                problems.append(
                    f"{key}: shape {tuple(tensor.shape)} but the adapter expects {tuple(target.shape)}"
                )
                continue
            plan.append((target, tensor))
        missing = sorted(set(params) - set(names.values()))
        if missing:
            problems.append(f"missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if not problems and plan:
            # one call for every factor (converting dtypes as copy_ does): 0.2 ms for SmolLM2's 120
            # tensors against 0.7 ms for a Python loop of copy_
            torch._foreach_copy_([t for t, _ in plan], [x for _, x in plan])
        return problems


_MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude: the parameter's and PEFT's saved name


def _excluded(path: str) -> bool:
    # Never wrap modules of our own heads (they live beside the base model, not in it).
    return path.startswith("heads.")


def _native_names(maps: KeyMap, keys: list[str], lora: set[str]) -> tuple[dict[str, str], list[str]]:
    """Map saved LoRA keys to the adapter's LoRA parameter names (``lora``) with the first key map under
    which every key names a distinct parameter.

    Returns:
        ``({saved key: native name}, problems)``; with problems, the map matching the most keys.
    """
    best: dict[str, str] = {}
    for _, fn in maps:
        native = {k: fn(k.removeprefix(PEFT_PREFIX).removesuffix(".weight")) for k in keys}
        hits = {k: n for k, n in native.items() if n in lora}
        if len(set(hits.values())) != len(hits):  # two saved keys onto one parameter: not this map
            continue
        if len(hits) == len(keys):
            return hits, []
        best = hits if len(hits) > len(best) else best
    unexpected = [k for k in keys if k not in best]
    problems = [f"unexpected key {k}" for k in unexpected[:8]]
    if len(unexpected) > 8:
        problems.append(f"... and {len(unexpected) - 8} more unexpected keys")
    if lora:
        problems.append(
            f"module paths were tried {' and '.join(h for h, _ in maps)}; this model's LoRA factors are "
            f"named like {sorted(lora)[0]!r} (was the adapter made on another architecture or for other modules?)"
        )
    return best, problems
