"""Adapter methods, registered by name. Each method owns its layers and turns per-row adapter names
into its part of the routing; the model has no method-specific branches."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from .lora import LoraLayer, LoraMethod
from .prefix import PrefixMethod

__all__ = ["METHODS", "LoraLayer", "Method", "get_method", "register_method"]


class Method(Protocol):
    """What the model needs from a method. ``selection`` must be cheap: it runs once per call."""

    name: str

    def add(self, name: str, config) -> None: ...
    def remove(self, name: str) -> None: ...
    def adapter_params(self, name: str) -> dict[str, nn.Parameter]: ...
    def selection(self, names: list[str | None]): ...


METHODS: dict[str, type] = {}


def register_method(name: str, cls: type) -> None:
    """Register a method class under ``name`` (its configs carry ``method = name``).

    Raises:
        ValueError: if the name is taken.
    """
    if name in METHODS:
        raise ValueError(f"adapter method {name!r} is already registered ({METHODS[name].__name__})")
    METHODS[name] = cls


def get_method(name: str) -> type:
    """The method class for ``name``; a KeyError lists the known names."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown adapter method {name!r}; known methods: {sorted(METHODS)}") from None


register_method("lora", LoraMethod)
register_method("prefix", PrefixMethod)
