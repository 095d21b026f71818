"""Old module paths (before the package was laid out by the flow of data) keep importing, with a
DeprecationWarning naming the new path: ``import adapters_mtl.io`` gives ``adapters_mtl.files.folder``.

A finder on ``sys.meta_path`` rather than a stub file per old name: the stubs would keep the old,
clashing names (``io``, ``model``/``models``) in the tree; here they are one table, removed in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED"]

MOVED = {
    "adapters_mtl.config": "adapters_mtl.core.config",
    "adapters_mtl.routing": "adapters_mtl.core.routing",
    "adapters_mtl.heads": "adapters_mtl.core.heads",
    "adapters_mtl.io": "adapters_mtl.files.folder",
    "adapters_mtl.peft_compat": "adapters_mtl.files.peft_format",
    "adapters_mtl.composer": "adapters_mtl.serving.composer",
    "adapters_mtl.composition": "adapters_mtl.serving.lorahub",
    "adapters_mtl.merging": "adapters_mtl.serving.merging",
    "adapters_mtl.tasks": "adapters_mtl.data.tasks",
    "adapters_mtl.models": "adapters_mtl.data.bases",
    "adapters_mtl.cli": "adapters_mtl.apps.cli",
    "adapters_mtl.recipe": "adapters_mtl.apps.recipe",
    "adapters_mtl.recipe_yaml": "adapters_mtl.apps.recipe_yaml",
    "adapters_mtl.run_checks": "adapters_mtl.apps.run_checks",
    "adapters_mtl.demo": "adapters_mtl.apps.demo",
}


# old modules whose names went to two new ones: the names below moved to the second
SPLIT = {"adapters_mtl.config": "adapters_mtl.methods"}
SPLIT_NAMES = {"adapters_mtl.config": ("LoraConfig", "PrefixConfig", "to_native")}


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; import it from there (the old path goes in adapters_mtl 0.3)",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(self.new)  # the same module object: one copy of its state
        extra = SPLIT.get(spec.name)
        if extra is None:
            return module
        # an old module whose contents now live in two places: a view that reads the first, then the other
        view = ModuleType(spec.name, module.__doc__)
        view.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        view.__dict__.update({k: getattr(importlib.import_module(extra), k) for k in SPLIT_NAMES[spec.name]})
        return view

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its new name


class _MovedFinder(importlib.abc.MetaPathFinder):
    # the import system passes (fullname, path, target) positionally; only the name matters here
    def find_spec(
        self, fullname: str, _path: object = None, _target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedLoader(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
