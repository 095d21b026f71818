"""What methods that wrap base layers share (IA3, AdaLoRA, bottleneck adapters): each adapter gets a global
slot (routing reads slots, 0 = none), each targeted Linear/Conv1D is replaced by the method's wrapper
(which keeps the layer it wraps as ``base_layer``, as PEFT's do), and merging folds every layer of one
adapter. LoRA keeps its own bookkeeping (stacked storage with reusable slots)."""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn
from typing_extensions import override

from ..core.quantize import refuse_merge
from ..core.routing import Route, SlotSelection, slot_selection
from .base import KeyMap, Method
from .lora_layer import is_lora_target_type

__all__ = ["LayerMethod", "MergingLayerMethod", "innermost", "match_saved_keys", "target_paths"]


def innermost(module: nn.Module) -> nn.Module:
    """The Linear/Conv1D under any wrappers (each keeps the module it wraps as ``base_layer``)."""
    while not is_lora_target_type(module):
        module = cast(nn.Module, module.base_layer)
    return module


def target_paths(model: nn.Module, wanted: Callable[[str], bool], own: type[nn.Module]) -> list[str]:
    """The paths of ``model``'s Linear/Conv1D layers that ``wanted`` accepts, a layer other methods have
    wrapped named by its outermost wrapper's path; task heads and the method's own wrappers (``own``) are
    never targets."""
    paths = set()
    for path, module in model.named_modules():
        if isinstance(module, own) or not is_lora_target_type(module):
            continue
        name = re.sub(r"(\.base_layer)+$", "", path)
        if not name.startswith("heads.") and wanted(name):
            paths.add(name)
    return sorted(paths)


def match_saved_keys(
    saved: Iterable[str],
    own: Container[str],
    key_maps: KeyMap,
    own_key: Callable[[str, Callable[[str], str | None]], str | None],
) -> dict[str, str]:
    """``{saved key: own key}`` by the key map (a way to read saved module paths on this model) that places
    the most saved keys; ``own_key(saved key, map)`` names the adapter's own key a saved key would fill
    under that map (None: none). Keys no map places are left out (the caller reports them)."""
    keys = list(saved)
    best: dict[str, str] = {}
    for _, fn in key_maps:
        hits = {k: o for k in keys if (o := own_key(k, fn)) is not None and o in own}
        if len(hits) > len(best):
            best = hits
        if len(best) == len(keys):
            break
    return best


class LayerMethod(Method):
    """A method whose adapters live in wrappers of base layers. Attributes: ``layers`` (target path ->
    wrapper), ``slot`` (adapter -> global slot), ``paths`` (adapter -> its target paths)."""

    idle_selection = 0

    def __init__(self, model: nn.Module, route: Route, *, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(model, route, adapter_dtype=adapter_dtype)
        self.layers: dict[str, Any] = {}
        self.slot: dict[str, int] = {}
        self.paths: dict[str, list[str]] = {}

    def wrap(self, path: str, make: Callable[[nn.Module], nn.Module]) -> Any:
        """The wrapper at ``path``, made with ``make(the module there)`` the first time."""
        if path not in self.layers:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            layer = make(getattr(parent, child))
            setattr(parent, child, layer)
            self.layers[path] = layer
        return self.layers[path]

    def next_slot(self) -> int:
        """A slot no adapter of this method holds (slots are never reused: routing stays unambiguous)."""
        return max(self.slot.values(), default=0) + 1

    @override
    def selection(self, names: Sequence[str | tuple[str, ...] | None]) -> SlotSelection:
        return slot_selection(names, self.slot, self.device)

    def device(self) -> torch.device:
        """Where the wrapped layers' weights are (the routing's row indices go there)."""
        layer = next(iter(self.layers.values()), None)
        return cast(torch.Tensor, innermost(layer.base_layer).weight).device if layer else torch.device("cpu")


class MergingLayerMethod(LayerMethod):
    """A :class:`LayerMethod` whose wrappers can fold one adapter into their base layer (``merge(name,
    keep_original)`` / ``unmerge()`` on each wrapper)."""

    def __init__(self, model: nn.Module, route: Route, *, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(model, route, adapter_dtype=adapter_dtype)
        self._merged: str | None = None

    @override
    def merge(self, name: str, keep_original: bool = True) -> None:
        refuse_merge(((p, innermost(self.layers[p].base_layer)) for p in self.paths[name]), name)
        for path in self.paths[name]:
            self.layers[path].merge(name, keep_original)
        self._merged = name

    @override
    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()
        self._merged = None

    @override
    def merged(self) -> str | None:
        return self._merged
