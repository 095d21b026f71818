"""Adapter methods, registered by name. Each method is a :class:`Method` subclass in its own module,
with its config beside it; the model, the files, merging, the composer and the trainer reach a method
only through that protocol, so adding one is a change in one room (see ``tests/methods/test_toy_method.py``,
which adds a method from a test file alone).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .adalora import AdaLoraMethod
from .adalora_config import AdaLoraConfig
from .base import Factors, KeyMap, Method, MethodConfig
from .bottleneck import BottleneckMethod
from .bottleneck_config import BottleneckConfig
from .ia3 import IA3Method
from .ia3_config import IA3Config
from .lora import LoraLayer, LoraMethod
from .lora_config import LoraConfig
from .prefix import PrefixMethod
from .prefix_config import PrefixConfig
from .prompt import PromptMethod
from .prompt_config import PromptConfig

__all__ = [
    "METHODS",
    "AdaLoraConfig",
    "BottleneckConfig",
    "Factors",
    "IA3Config",
    "KeyMap",
    "LoraConfig",
    "LoraLayer",
    "Method",
    "MethodConfig",
    "PrefixConfig",
    "PromptConfig",
    "get_method",
    "method_for_peft_config",
    "register_method",
    "to_native",
    "unregister_method",
]

METHODS: dict[str, type[Method]] = {}


def register_method(method: type[Method] | str, cls: type[Method] | None = None) -> type[Method]:
    """Register a :class:`Method` subclass under its ``name`` (``register_method(cls)``; the older
    ``register_method(name, cls)`` form is accepted). Registration order is the order of an adapter's
    parts in its folder (the first method's files at the top level). Returns the class (a decorator).

    Raises:
        ValueError: the name is taken, or the class lacks ``name`` / ``config_class``.
        TypeError: not a :class:`Method` subclass.
    """
    if isinstance(method, str):
        if cls is None:
            raise TypeError("register_method(name, cls) needs the class")
        if getattr(cls, "name", method) != method:
            raise ValueError(f"register_method({method!r}, ...): the class is named {cls.name!r}")
        cls.name = method
        method = cls
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"expected a subclass of adapters_mtl.methods.Method, got {method!r}")
    missing = [a for a in ("name", "config_class") if not hasattr(method, a)]
    if missing:
        raise ValueError(f"method class {method.__name__} does not set {missing}")
    if method.name in METHODS:
        raise ValueError(
            f"adapter method {method.name!r} is already registered ({METHODS[method.name].__name__})"
        )
    claimed = {k: m.name for m in METHODS.values() for k in m.peft_config_types}
    taken = sorted(k for k in method.peft_config_types if k in claimed)
    if taken:
        raise ValueError(
            f"PEFT config types {taken} are already read by method {claimed[taken[0]]!r}; one PEFT type maps to "
            "one method (unregister_method() that one first to replace it)"
        )
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (for tests and plugins that replace one). Models that already hold
    adapters of it keep their instance."""
    get_method(name)
    del METHODS[name]


def get_method(name: str) -> type[Method]:
    """The method class for ``name``; a KeyError lists the known names."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown adapter method {name!r}; known methods: {sorted(METHODS)}") from None


def method_for_peft_config(peft_config: Any) -> type[Method] | None:
    """The method that reads this PEFT config object (by its class name), or None."""
    kind = type(peft_config).__name__
    return next((m for m in METHODS.values() if kind in m.peft_config_types), None)


def file_order(methods: Iterable[str]) -> list[str]:
    """Method names in registration order (the order of an adapter's parts in its folder)."""
    wanted = set(methods)
    return [m for m in METHODS if m in wanted]


def to_native(config: Any) -> tuple[Any, ...]:
    """Normalise one config, a PEFT config, or a list of them (one per method) to native configs.

    Raises:
        TypeError: for anything else, naming the accepted types.
        ValueError: for two configs of the same method in one adapter.
    """
    items = list(config) if isinstance(config, (list, tuple)) else [config]
    natives = {m.config_class: m for m in METHODS.values()}
    out = []
    for item in items:
        if type(item) in natives:
            out.append(item)
            continue
        method = method_for_peft_config(item) if type(item).__module__.startswith("peft") else None
        if method is None:
            accepted = [f"adapters_mtl.{m.config_class.__name__}" for m in METHODS.values()]
            accepted += [f"peft.{k}" for m in METHODS.values() for k in m.peft_config_types]
            raise TypeError(
                f"unsupported adapter config {type(item).__name__} from {type(item).__module__}: expected "
                f"{', '.join(accepted)}, or a list of configs of different methods."
            )
        out.append(method.config_from_peft(item))
    if isinstance(config, (list, tuple)) and not out:
        return ()  # a head-only adapter (the model checks that it has a head)
    methods = [c.method for c in out]
    if not out or len(set(methods)) != len(methods):
        raise ValueError(
            f"an adapter takes one config per method (e.g. one LoRA and one prefix), got {methods}"
        )
    return tuple(out)


register_method(LoraMethod)
register_method(PrefixMethod)
register_method(IA3Method)
register_method(PromptMethod)
register_method(BottleneckMethod)
register_method(AdaLoraMethod)
