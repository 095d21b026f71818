"""The method protocol: everything the model, the files, merging, the composer and the trainer need from
an adapter method. A method is a subclass of :class:`Method` registered with
:func:`adapters_mtl.methods.register_method`; nothing outside its own module names it.

A method instance belongs to one :class:`~adapters_mtl.model.AdapterModel` and holds every adapter
of that method on it (LoRA keeps all adapters' factors stacked per layer, prefix one bank of prefixes).
Per call, the model asks each method for its :meth:`Method.selection` of the rows' adapters and puts it
in the call's routing under the method's name; the method's layers read it back with
``route.get(name)``. That is the whole routing contract: one selection per method per call.
"""

# The defaults below are what a method that lacks an ability does; they ignore their arguments by design.
# ruff: noqa: ARG002, ARG003

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..core.routing import Route, StaticSlot

__all__ = ["Factors", "KeyMap", "Method", "MethodConfig"]

# {module path: (A (r, in), B (out, r), scale)}: an adapter's weight update ΔW = scale·B·A per module
Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
# ways to read a module path saved by PEFT: (how, saved path -> this model's path or None)
KeyMap = list[tuple[str, Callable[[str], str | None]]]


class MethodConfig(Protocol):
    """What a method's native config provides (in practice a frozen dataclass, e.g. ``LoraConfig``)."""

    @property
    def method(self) -> str:
        """The name of the method it configures (``Method.name``)."""
        ...

    def to_peft(self, **extra: Any) -> Any:
        """The equivalent PEFT config object (``extra``: PEFT's fields such as ``task_type``)."""
        ...

    @classmethod
    def from_peft(cls, cfg: Any) -> MethodConfig:
        """The native config of a PEFT config object."""
        ...


class Method:
    """Base class of adapter methods (subclass it; override what the method can do).

    Class attributes:
        name: the method's name: ``config.method`` of its configs, its key in the routing and in the
            card's ``methods``, its recipe key (``adapter: {name: {...}}``), and its sub-folder when an
            adapter has several methods.
        config_class: its native config (a frozen dataclass with ``method = name``, ``to_peft()`` and
            ``from_peft()``).
        peft_config_types: names of the PEFT config classes this method reads (``"LoraConfig"``).
        idle_selection: the selection of a call in which no row uses the method (what its layers read
            when nothing is routed to it).
        recomputable: whether activation checkpointing may recompute its layers in backward (the
            recomputation runs after the call's routing has ended; per-call state such as prefix
            keys/values is gone by then).

    Instance attributes:
        module: an ``nn.Module`` holding parameters kept outside the base model (the model registers
            it, so they move with ``.to()`` and appear in ``state_dict``), or None.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    peft_config_types: ClassVar[tuple[str, ...]] = ()
    idle_selection: ClassVar[object] = None
    recomputable: ClassVar[bool] = True

    def __init__(self, model: nn.Module, route: Route, *, adapter_dtype: torch.dtype | None = None) -> None:
        self.model, self.route, self.adapter_dtype = model, route, adapter_dtype
        self.module: nn.Module | None = None

    # ------------------------------------------------------------ adapters (required)
    def add(self, name: str, config: Any) -> None:
        """Attach adapter ``name`` with this method's ``config``; attach nothing on error."""
        raise NotImplementedError

    def remove(self, name: str) -> None:
        """Detach ``name`` and free its memory."""
        raise NotImplementedError

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """Every parameter of ``name``, keyed by a stable name unique across methods."""
        raise NotImplementedError

    def selection(self, names: Sequence[str | tuple[str, ...] | None]) -> object:
        """This method's routing for one entry per row (a name, None, or a tuple = a stack); must be
        cheap (it runs once per call). Rows whose adapters this method does not hold get nothing."""
        raise NotImplementedError

    # ------------------------------------------------------------ optional abilities
    def compact(self) -> None:
        """Release spare capacity after many adds/removes (parameters stay the same objects)."""

    def static_selection(self, selection: object, slot: StaticSlot, merged: bool) -> object:
        """The selection :meth:`AdapterModel.static_routing` uses instead of ``selection`` (a tensor a
        compiled model reads as data); ``merged``: an adapter is folded into the base weights."""
        return selection

    def factors(self, name: str, state: Mapping[str, torch.Tensor] | None = None) -> Factors:
        """``name``'s weight update as low-rank factors (views of the live values; ``state``, keyed as
        :meth:`adapter_params`, replaces them, e.g. a snapshot). Methods whose update is not a weight
        delta (prefix tuning) raise ``NotImplementedError``; merging refuses them."""
        raise NotImplementedError(f"{self.name} adapters are not a weight update (nothing to merge)")

    def merge(self, name: str, keep_original: bool = True) -> None:
        """Fold ``name`` into the base weights (see :meth:`AdapterModel.merge`)."""
        raise NotImplementedError(f"{self.name} adapters cannot be merged into the base weights")

    def unmerge(self) -> None:
        """Restore the base weights after :meth:`merge` (no-op when nothing is merged)."""

    def merged(self) -> str | None:
        """The adapter of this method folded into the base weights, or None."""
        return None

    @classmethod
    def can_merge(cls) -> bool:
        """Whether adapters of this method can be folded into the base weights (:meth:`merge`)."""
        return cls.merge is not Method.merge

    @classmethod
    def has_factors(cls) -> bool:
        """Whether adapters of this method are low-rank weight updates (:meth:`factors`: what merging
        several adapters into one and stack folding combine)."""
        return cls.factors is not Method.factors

    def owns_parameter(self, qualified_name: str, parameter: nn.Parameter) -> bool:
        """Whether a parameter found inside the base model belongs to this method (its layers wrap base
        layers, so ``base.named_parameters()`` lists both)."""
        return False

    def training_loss(self, names: Sequence[str]) -> torch.Tensor | None:
        """A term the trainer adds to each batch's loss before backward, for this method's adapters among
        ``names`` (the adapters the batch routes to; others are ignored), e.g. AdaLoRA's orthogonality
        regulariser. None: nothing to add."""
        return None

    def after_step(self, names: Sequence[str], global_step: int, total_steps: int) -> None:
        """Called by the trainer after each optimiser step, before the gradients are zeroed, with every
        adapter the run trains (``names``; others are ignored), the step just taken (counted from 1) and the
        run's length in steps; e.g. AdaLoRA's rank allocation from the gradients still in ``.grad``."""

    def settles_at(self, name: str, total_steps: int) -> int:
        """The first step of a run of ``total_steps`` at which ``name`` has its final form (AdaLoRA: when its
        ranks are allocated for good); early stopping keeps no snapshot from before it. 0 for most."""
        return 0

    def folded(self, name: str) -> tuple[Any, dict[str, torch.Tensor]] | None:
        """``name`` as an adapter of another method that computes the same outputs and is what serving
        should use (AdaLoRA → a plain LoRA with per-module ranks): ``(that method's config, state keyed as
        its adapter_params)``, or None when the method is served as it is."""
        return None

    def added_positions(self, config: Any) -> int:
        """Positions an adapter of this ``config`` takes before the text (prefix tuning's virtual tokens),
        which a base with a fixed number of positions must have room for."""
        return 0

    # ------------------------------------------------------------ files: a method PEFT has no format for
    @classmethod
    def has_peft_format(cls) -> bool:
        """Whether PEFT reads adapters of this method (it names PEFT config types). A method without one
        saves its part in adapters_mtl's own format: its config as JSON (``adapters_mtl_config.json``) beside
        its tensors, under the keys of :meth:`peft_state` (then "PEFT's names" below mean the method's own)."""
        return bool(cls.peft_config_types)

    @classmethod
    def config_from_dict(cls, data: Mapping[str, Any]) -> Any:
        """The native config saved as a JSON object (``files.card.config_dict``'s form). Raises ValueError
        naming the fields that are wrong."""
        fields = dict(data)
        try:
            return cls.config_class(**fields)
        except TypeError as e:
            raise ValueError(f"invalid {cls.config_class.__name__} fields {sorted(fields)}: {e}") from e

    # ------------------------------------------------------------ files: PEFT's format both ways
    @classmethod
    def config_from_peft(cls, peft_config: Any, *, saved: bool = False) -> Any:
        """The native config of a PEFT config (``saved``: read from an adapter folder, which holds the
        inference form of the weights). Raises ValueError for options this method does not support."""
        return cls.config_class.from_peft(peft_config)

    @classmethod
    def owns_peft_key(cls, key: str) -> bool:
        """Whether a key of a saved PEFT state belongs to this method (to split a state that holds
        several methods' tensors)."""
        return False

    @classmethod
    def check_peft_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """Problems of a saved PEFT state of this method, checked without a model (key names, pairs)."""
        return []

    def loading_config(self, config: Any) -> Any:
        """The config to attach an adapter with before its saved values are copied in (e.g. skipping a
        random initialisation)."""
        return config

    def peft_config(self, name: str, config: Any, *, task_type: str, base_model: str | None) -> Any:
        """PEFT's config object for adapter ``name`` (``config``: its native config)."""
        return config.to_peft(task_type=task_type, base_model_name_or_path=base_model)

    def check_peft_config(self, peft_config: Any) -> str | None:
        """What makes a saved PEFT config unusable on this model (e.g. another geometry), or None."""
        return None

    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        """``name``'s tensors under PEFT's saved key names (contiguous copies, safe for safetensors)."""
        raise NotImplementedError

    def load_peft_state(self, name: str, state: Mapping[str, torch.Tensor], key_maps: KeyMap) -> list[str]:
        """Copy a saved PEFT state into ``name`` (attached with :meth:`loading_config`); returns every
        problem (missing, unexpected or mis-shaped keys) and copies nothing when there is one.
        ``key_maps``: ways to read saved module paths on this model (see ``core.module_paths.key_maps``)."""
        raise NotImplementedError
