"""The adapter card (``adapter_card.json``): our record of an adapter folder — task, methods, configs,
base fingerprint, head, metrics and the sha256 of every file — its schema checks, and the README
rendered from it. File names of a folder are defined here too."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.config import HeadConfig, validate_name
from .safe_read import (
    MAX_CARD_BYTES,
    AdapterFileError,
    read_regular,
    safe_relpath,
)

__all__ = [
    "CARD",
    "CONFIG",
    "NATIVE_CONFIG",
    "HEAD_PREFIX",
    "HEAD_WEIGHTS",
    "WEIGHTS",
    "card_head",
    "check_files",
    "config_dict",
    "library_version",
    "parse_card",
    "read_card",
    "readme_for_card",
    "verify_files",
]

CARD = "adapter_card.json"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# the config of a part whose method PEFT has no format for (e.g. bottleneck): {"method", "config", "library"}
NATIVE_CONFIG = "adapters_mtl_config.json"
HEAD_WEIGHTS = "head.safetensors"  # the task head (heads.head_shapes names its tensors), listed in the card
# heads written before head.safetensors existed live in adapter_model.safetensors under this prefix (read
# for compatibility; vLLM and LoRAX refuse any key that is not a LoRA weight, so it is no longer written)
HEAD_PREFIX = "adapters_mtl.head."
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CARD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "task": (str,),
    "description": (str, type(None)),
    "methods": (list,),
    "configs": (dict,),
    "base_model": (str, type(None)),
    "base_model_type": (str, type(None)),
    "base_fingerprint": (str, type(None)),
    "head": (dict, type(None)),
    "label_names": (list, type(None)),
    "metrics": (dict,),
    "recipe": (dict,),
    "created": (str,),
    "library": (str,),
    "files": (dict,),
}


def library_version() -> str:
    from .. import __version__  # the package's __init__ imports this module: read it late

    return __version__


def config_dict(cfg: Any) -> dict[str, Any]:

    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "method"}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def readme_for_card(card: dict) -> str:
    head = f"{card['head']['kind']} ({card['head']['num_labels']} labels)" if card["head"] else "none"
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {card['base_model'] or 'unknown'}",
        "tags: [adapters_mtl, " + ", ".join(card["methods"]) + "]",
        "---",
        f"# {card['name']}",
        "",
        card.get("description") or f"A {' + '.join(card['methods'])} adapter for the task `{card['task']}`.",
        "",
        f"- base model: `{card['base_model']}` (fingerprint `{card['base_fingerprint'][:23]}…`)",
        f"- head: {head}",
        f"- labels: {', '.join(card['label_names']) if card['label_names'] else '-'}",
        f"- metrics: {card['metrics'] or '-'}",
        f"- created: {card['created']} with {card['library']}",
        "",
        "Load with `adapters_mtl.files.folder.load_adapter(model, path)`, or with PEFT: "
        "`PeftModel.from_pretrained(base, path)` (the LoRA or prefix part; heads are adapters_mtl's).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Reading a folder. Everything below is checked without a model (what `read_adapter` returns is what the
# registry's publish and verify accept), then `load_adapter` adds the checks that need the base model.
# Written by hand: PEFT reads folders it trusts (it follows symlinks, falls back to the Hub for a missing
# config and unpickles .bin files); a registry that serves other people's files cannot.


def parse_card(data: bytes, where: str) -> dict:
    """The adapter card in ``data``, checked field by field.

    Raises:
        AdapterFileError: not JSON, not an object, a field of the wrong type, a bad ``files`` entry or head.
    """
    try:
        card = json.loads(data)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a number of 4300+ digits
        raise AdapterFileError(f"{where} is not a readable adapter card ({e}); the folder is damaged") from e
    if not isinstance(card, dict):
        raise AdapterFileError(
            f"{where} holds a JSON {type(card).__name__}; an adapter card is a JSON object "
            "(as written by save_adapter); the folder is damaged"
        )
    problems = [
        f"{key!r} is {type(card[key]).__name__}, expected {' or '.join(t.__name__ for t in types)}"
        for key, types in _CARD_TYPES.items()
        if key in card and not isinstance(card[key], types)
    ]
    if "files" not in card:
        problems.append("'files' (the sha256 of every file) is missing")
    if problems:
        raise AdapterFileError(f"{where} is not a valid adapter card: " + "; ".join(problems))
    for rel, digest in card["files"].items():
        safe_relpath(rel, where)
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise AdapterFileError(f"{where}: the sha256 of {rel!r} is {digest!r}, expected 64 hex digits")
    if card.get("name") is not None:
        try:
            validate_name(card["name"])
        except ValueError as e:
            raise AdapterFileError(f"{where}: {e}") from e
    if card.get("methods") is not None and not all(isinstance(m, str) for m in card["methods"]):
        raise AdapterFileError(f"{where}: 'methods' must be a list of strings, got {card['methods']!r}")
    card_head(card, where)
    return card


def card_head(card: dict, where: str) -> HeadConfig | None:
    spec = card.get("head")
    if not spec:
        return None
    fields = {f.name for f in dataclasses.fields(HeadConfig)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise AdapterFileError(
            f"{where}: the card's head has unknown keys {unknown}; expected some of {sorted(fields)} "
            "(the card was edited, or written by a newer adapters_mtl)"
        )
    spec = dict(spec)
    if isinstance(spec.get("label_names"), list):
        spec["label_names"] = tuple(spec["label_names"])
    try:
        return HeadConfig(**spec)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{where}: the card's head is not valid: {e}") from e


def read_card(directory: str | os.PathLike[str]) -> dict | None:
    """The checked adapter card of a folder, or None for a plain PEFT folder (no card)."""

    root = Path(directory)
    data = read_regular(root, CARD, limit=MAX_CARD_BYTES)
    return None if data is None else parse_card(data, str(root / CARD))


def check_files(
    card: dict, read: Callable[[str], bytes | None], present: list[str], where: str
) -> dict[str, bytes]:
    """Check the files a card lists against their recorded sha256, whatever store holds them.

    Args:
        card: the adapter card (its ``files`` maps relative path -> sha256).
        read: ``read(rel) -> bytes | None`` (None: the file is missing).
        present: relative paths of the ``*.safetensors`` files in the folder (each must be listed).
        where: the folder, for messages.

    Returns:
        The verified bytes of each listed file (so callers parse exactly what was checked, read once).

    Raises:
        AdapterFileError: naming every missing, changed or unlisted file at once.
    """
    problems = []
    blobs: dict[str, bytes] = {}
    listed = card.get("files", {})
    for rel, digest in listed.items():
        data = read(safe_relpath(rel, where))
        if data is None:
            problems.append(f"{rel} is missing")
            continue
        blobs[rel] = data
        if hashlib.sha256(data).hexdigest() != digest:
            problems.append(f"{rel} does not match its recorded sha256 (edited or truncated)")
    problems += [f"{rel} is not listed in the card" for rel in present if rel not in listed]
    if problems:
        raise AdapterFileError(f"adapter folder {where} failed verification: " + "; ".join(problems))
    return blobs


def verify_files(directory: str | os.PathLike[str], card: dict) -> dict[str, bytes]:
    """:func:`check_files` for a local folder (no symlink is followed)."""
    root = Path(directory)
    present = [p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")]
    return check_files(card, lambda rel: read_regular(root, rel), present, str(root))
