"""The package's rooms import one way: apps -> training, serving -> registry -> files -> model -> methods
-> core (data beside core), and training and serving never import each other (README "Layout").
Every import counts, also inside functions and TYPE_CHECKING blocks."""

from __future__ import annotations

import ast
from pathlib import Path

import adapters_mtl

PACKAGE = Path(adapters_mtl.__file__).parent
RANK = {
    "core": 0,
    "data": 1,
    "methods": 1,
    "model": 2,
    "files": 3,
    "registry": 4,
    "serving": 5,
    "training": 5,
    "apps": 6,
}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "adapters_mtl" and parts[1] in RANK else None


def _imports(path: Path) -> list[str]:
    """Absolute names of the adapters_mtl modules ``path`` imports (relative imports resolved)."""
    here = ["adapters_mtl", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = here[:-1] if here[-1] != "__init__" else here[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] if not node.module and node.level else [target]
            out += names
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [m for m in out if m.startswith("adapters_mtl")]


def test_every_import_points_down_the_layout():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _room(".".join(["adapters_mtl", *path.relative_to(PACKAGE).with_suffix("").parts]))
        if source is None:
            continue  # the package's __init__ and _moved.py (the public surface and old paths)
        for target in _imports(path):
            room = _room(target)
            if room is None or room == source:
                continue
            if RANK[room] > RANK[source] or {source, room} == {"serving", "training"}:
                wrong.append(f"{path.relative_to(PACKAGE)} ({source}) imports {target} ({room})")
    assert wrong == []


def test_the_rooms_are_the_ones_the_readme_lists():
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} | {"model"}
    assert rooms == set(RANK)
