"""Old module paths keep importing (the same module objects) with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib
import subprocess
import sys

from adapters_mtl._moved import MOVED


def test_old_paths_are_the_new_modules_with_a_warning():
    # a fresh interpreter: in this one the old names may already be imported (no warning the second time)
    code = (
        "import importlib, json, sys, warnings\n"
        "import adapters_mtl\n"
        "from adapters_mtl._moved import MOVED, SPLIT, SPLIT_NAMES\n"
        "bad = []\n"
        "for old, new in sorted(MOVED.items()):\n"
        "    module = importlib.import_module(new)\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        got = importlib.import_module(old)\n"
        "    said = [str(w.message) for w in caught if w.category is DeprecationWarning]\n"
        "    if old in SPLIT:  # a view of both new homes\n"
        "        other = importlib.import_module(SPLIT[old])\n"
        "        same = all(getattr(got, k) is v for k, v in vars(module).items() if not k.startswith('__'))\n"
        "        same = same and all(getattr(got, k) is getattr(other, k) for k in SPLIT_NAMES[old])\n"
        "    else:\n"
        "        same = got is module\n"
        "    if not same or not any(new in s for s in said):\n"
        "        bad.append((old, said))\n"
        "print(json.dumps(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert len(MOVED) == 15


def test_no_module_shadows_the_standard_library():
    import pkgutil

    import adapters_mtl

    stdlib = set(sys.stdlib_module_names)
    clashes = [
        m.name
        for m in pkgutil.walk_packages(adapters_mtl.__path__, "adapters_mtl.")
        if m.name.rsplit(".", 1)[-1] in stdlib
    ]
    assert clashes == []
    assert importlib.import_module("adapters_mtl").__version__
