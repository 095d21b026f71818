"""Reading recipes safely: YAML 1.2 scalars, bounded size and alias expansion, plain copies, ``key=value``
overrides, and checking values against dataclass field types (so a recipe's problems name their keys)."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml

__all__ = ["MAX_BYTES", "MAX_NODES", "RecipeError", "apply_overrides", "read_yaml", "report", "type_problems"]

MAX_BYTES = 1_000_000  # a recipe is a page of YAML
MAX_NODES = 100_000  # values after alias expansion (a "billion laughs" file expands to 10⁹)


class RecipeError(ValueError):
    """A recipe that cannot run: names the key, what was received and the expected form."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core scalars: ``1e-3`` is a float (YAML 1.1 needs a dot),
    ``yes``/``no``/``on``/``off`` stay strings (``mixed_precision: no``), and dates stay strings."""


_BOOL, _FLOAT, _TIME = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"

_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT, _TIME)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
            |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _check_expansion(node: yaml.Node, where: str) -> None:
    """Refuse documents whose aliases expand past MAX_NODES values, before anything is constructed. Each
    node's expanded size is computed once (aliases share nodes), so this is linear in the file."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise RecipeError(f"{where}: an alias refers to the node that contains it (a recursive recipe)")
        active.add(key)
        if isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        else:
            total = 1
        active.discard(key)
        if total > MAX_NODES:
            raise RecipeError(
                f"{where}: its anchors and aliases expand to more than {MAX_NODES:,} values (a 'billion "
                "laughs' file?); a recipe needs a few hundred: write the values out or use fewer nested aliases"
            )
        sizes[key] = total
        return total

    size(node)


def read_yaml(text: str, where: str = "recipe") -> Any:
    """Parse one YAML document safely: YAML 1.2 scalars, at most MAX_BYTES, aliases expanding to at most
    MAX_NODES values; returns plain dicts, lists and scalars (no shared objects).

    Raises:
        RecipeError: too large, alias bomb, invalid YAML, or values of other types (dates, binary, sets).
    """
    if len(text) > MAX_BYTES or len(text.encode("utf-8", "replace")) > MAX_BYTES:
        size = len(text.encode("utf-8", "replace"))
        raise RecipeError(f"{where} is {size:,} bytes; recipes are limited to {MAX_BYTES:,}")
    try:
        loader = _Loader(text)  # its reader refuses control characters here already
    except yaml.YAMLError as e:
        raise RecipeError(f"{where} is not valid YAML: {e}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise RecipeError(f"{where} is not valid YAML: {e}") from None
    except RecursionError:
        raise RecipeError(f"{where} is nested too deeply to be a recipe") from None
    finally:
        loader.dispose()
    return _plain(data, where)


def _plain(value: Any, where: str) -> Any:
    """A copy made of dicts (string keys), lists and scalars: aliases become independent copies (bounded by
    the expansion check), so an override of one place never changes another."""
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise RecipeError(f"{where}: keys must be strings, got {bad[:3]}; quote them")
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise RecipeError(
        f"{where}: {type(value).__name__} values are not supported in recipes ({value!r}); quote it"
    )


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (``tasks.0.limit=50`` indexes lists) to a copy of ``recipe``.

    Raises:
        RecipeError: every override that is not ``key=value``, indexes past a list's end, or goes into a
            value that is not a mapping or a list (``train.steps.x=1``), all at once.
    """
    out = _plain(recipe, "recipe")
    problems = []
    for item in overrides:
        key, eq, raw = item.partition("=")
        parts = key.split(".")
        if not eq or not all(parts):
            problems.append(f"override {item!r} is not key=value with a dotted key (e.g. train.steps=5)")
            continue
        try:
            value = read_yaml(raw, f"override {item!r}")
        except RecipeError as e:
            problems.append(str(e))
            continue
        node: Any = out
        for depth, part in enumerate(parts):
            here, last = ".".join(parts[:depth]), depth == len(parts) - 1
            if isinstance(node, dict):
                if last:
                    node[part] = value
                elif node.get(part) is None:  # absent or null: a mapping grows there
                    node[part] = {}
                    node = node[part]
                else:
                    node = node[part]
            elif isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(
                        f"override {item!r}: {here} is a list of {len(node)} (indices 0 to {len(node) - 1}), so "
                        f"{part!r} is not in it; use an index from 0 to {len(node) - 1}"
                    )
                    break
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            else:
                problems.append(
                    f"override {item!r}: {here} is {node!r} (not a mapping or a list), so it has no key "
                    f"{part!r}; set {here}=VALUE itself"
                )
                break
    if problems:
        raise RecipeError(report(problems))
    return out


def report(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def _fits(value: Any, tp: Any) -> bool:
    """Does a YAML value fit a dataclass field annotation (lists stand for tuples)? Unknown
    annotations fit anything: the class's ``__post_init__`` decides."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return origin is list or (len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args)))  # noqa: B905
    if tp is dict or origin in (dict, Mapping):
        return isinstance(value, dict) and (not args or all(_fits(v, args[1]) for v in value.values()))
    return True


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (tuple, list) and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is tuple:
        return (
            f"a list of {len(args)} numbers"
            if all(a is float for a in args)
            else f"a list of {len(args)} values"
        )
    if tp is dict or origin in (dict, Mapping):
        return "a mapping"
    names = {int: "an int", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _kind(value: Any) -> str:
    kinds = (
        (bool, "true/false"),  # before int: a bool is an int
        (int, "an int"),
        (float, "a number"),
        (str, "a string"),
        (dict, "a mapping"),
        (list, "a list"),
        (type(None), "null"),
    )
    for tp, name in kinds:
        if isinstance(value, tp):
            return name
    return type(value).__name__


def type_problems(cls: type, fields: dict, where: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in fields.items():
        if key in hints and not _fits(value, hints[key]):
            hint = ""
            if isinstance(value, str) and re.fullmatch(r"[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?", value.strip()):
                hint = "; write the number without quotes"
            out.append(
                f"{where}.{key}: expected {_describe(hints[key])}, got {value!r} ({_kind(value)}){hint}"
            )
    return out
