"""AdapterRegistry: versions, aliases, filters, verification, crashes and concurrent publishers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import uuid

import pytest
import torch
from helpers import batch, make_config, tiny

from adapters_mtl import AdapterModel, HeadConfig
from adapters_mtl.files.folder import AdapterFileError, save_adapter
from adapters_mtl.registry import AdapterRegistry, RegistryError


@pytest.fixture
def base():
    return tiny("bert", seed=4)


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path):
    root = str(tmp_path / "reg") if request.param == "local" else f"memory://reg-{uuid.uuid4().hex}"
    return AdapterRegistry(root, catalog=tmp_path / "catalog.sqlite")


def _model(base, *names, method="lora"):
    model = AdapterModel(copy.deepcopy(base)).eval()
    for i, name in enumerate(names):
        torch.manual_seed(i)
        model.add_adapter(name, make_config(method, "bert", 0), head=HeadConfig(num_labels=2 + i))
    return model


def test_publish_resolve_list_show_load_remove(registry, base, tmp_path):
    model = _model(base, "news", "tone")
    model_p = _model(base, "tone", method="prefix")
    assert (
        registry.publish(model, adapter="news", tags=["bbc"], task="topic", metrics={"acc": 0.9}) == "news@1"
    )
    assert registry.publish(model, adapter="news", aliases=["prod"]) == "news@2"
    assert registry.publish(model_p, adapter="tone") == "tone@1"
    folder = save_adapter(model, "tone", tmp_path / "tone_folder")
    assert registry.publish(folder, tags=["tweets"]) == "tone@2"  # from a folder, name from the card

    assert registry.resolve("news").version == 2 == registry.resolve("news@latest").version
    assert registry.resolve("news@1").version == 1 and registry.resolve("news@prod").version == 2
    registry.set_alias("news@1", "prod")
    assert registry.resolve("news@prod").version == 1
    assert [r.ref for r in registry.list()] == ["news@1", "news@2", "tone@1", "tone@2"]
    assert [r.ref for r in registry.list(tag="bbc")] == ["news@1"]
    assert [r.ref for r in registry.list(task="topic")] == ["news@1"]
    assert [r.ref for r in registry.list(method="prefix")] == ["tone@1"]
    shown = registry.show("news@1")
    assert (
        shown["card"]["metrics"] == {"acc": 0.9} and shown["aliases"] == ["prod"] and shown["tags"] == ["bbc"]
    )
    assert set(registry.verify().values()) == {"ok"}

    fresh = AdapterModel(copy.deepcopy(base)).eval()
    assert registry.load(fresh, "news@prod") == "news"
    inputs = batch(2, 5)
    with torch.no_grad():
        want = model(**inputs, adapters="news").row_logits
        got = fresh(**inputs, adapters="news").row_logits
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))

    registry.remove("news@1")
    assert [r.ref for r in registry.list()] == ["news@2", "tone@1", "tone@2"]
    with pytest.raises(RegistryError, match="has no alias 'prod'"):
        registry.resolve("news@prod")  # the alias pointed at the removed version
    with pytest.raises(RegistryError, match=r"has no version 7; versions: \[2\]"):
        registry.resolve("news@7")
    with pytest.raises(RegistryError, match=r"no adapter named 'nope'.*published names: \['news', 'tone'\]"):
        registry.resolve("nope")
    assert registry.publish(model, adapter="news") == "news@3"  # versions are never reused


@pytest.mark.parametrize("bad", ["../x", "/abs", "a b", "x/y", "a.b", "..", "a@b@c"])
def test_names_are_validated(registry, base, bad):
    with pytest.raises((ValueError, RegistryError)):
        registry.publish(_model(base, "ok"), bad, adapter="ok")
    with pytest.raises((ValueError, RegistryError)):
        registry.resolve(bad)
    assert registry.list() == []


def test_reserved_aliases(registry, base):
    with pytest.raises(ValueError, match="reserved"):
        registry.publish(_model(base, "a"), adapter="a", aliases=["latest"])


def test_verify_and_load_detect_edited_files(tmp_path, base):
    registry = AdapterRegistry(tmp_path / "reg")
    registry.publish(_model(base, "a"), adapter="a")
    weights = tmp_path / "reg" / "adapters" / "a" / "1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "does not match its recorded sha256" in registry.verify("a@1")["a@1"]
    fresh = AdapterModel(copy.deepcopy(base))
    with pytest.raises(AdapterFileError, match="sha256"):
        registry.load(fresh, "a")
    assert fresh.adapter_names == []


def test_catalog_rebuilds_from_files(tmp_path, base):
    registry = AdapterRegistry(tmp_path / "reg")
    model = _model(base, "a", "b")
    for name in ("a", "b", "a"):
        registry.publish(model, adapter=name, aliases=["prod"])
    before = registry.list()
    os.remove(registry.catalog_path)
    again = AdapterRegistry(tmp_path / "reg")
    assert again.list() == before and again.resolve("a@prod").version == 2
    assert again.rebuild() == 3


_PUBLISH = """
import sys
from adapters_mtl.registry import AdapterRegistry
print(AdapterRegistry(sys.argv[1]).publish(sys.argv[2], sys.argv[3]))
"""


def _run_publish(root, folder, name, crash=None):
    env = dict(os.environ, ADAPTERS_MTL_CRASH_AT=crash or "")
    return subprocess.Popen(
        [sys.executable, "-c", _PUBLISH, str(root), str(folder), name],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_killed_publisher_leaves_no_half_visible_adapter(tmp_path, base):
    folder = save_adapter(_model(base, "a"), "a", tmp_path / "a")
    root = tmp_path / "reg"
    AdapterRegistry(root)
    proc = _run_publish(root, folder, "a", crash="staged")  # dies after staging, before the rename
    assert proc.wait(120) == 17
    registry = AdapterRegistry(root)
    assert registry.list() == [] and not (root / "adapters" / "a").exists()
    proc = _run_publish(root, folder, "a", crash="visible")  # dies after the rename, before the catalog row
    assert proc.wait(120) == 17
    registry = AdapterRegistry(root)  # files are the truth: the version is there, complete and verified
    assert [r.ref for r in registry.list()] == ["a@1"] and registry.verify() == {"a@1": "ok"}
    for stage in (root / "staging").iterdir():  # a stage is only cleaned up once it is a minute old
        os.utime(stage, (0, 0))
    registry.rebuild()  # drops the staging leftovers of the first crash
    assert list((root / "staging").iterdir()) == []
    assert registry.publish(folder) == "a@2"


def test_eight_concurrent_publishers_lose_nothing(tmp_path, base):
    folder = save_adapter(_model(base, "a"), "a", tmp_path / "a")
    root = tmp_path / "reg"
    AdapterRegistry(root)
    procs = [_run_publish(root, folder, "shared" if i % 2 else f"own{i}") for i in range(8)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(out.strip())
    shared = sorted(o for o in outs if o.startswith("shared@"))
    assert shared == ["shared@1", "shared@2", "shared@3", "shared@4"]
    registry = AdapterRegistry(root)
    refs = [r.ref for r in registry.list()]
    assert sorted(refs) == sorted(outs)
    on_disk = sorted(
        f"{n.name}@{v.name}" for n in (root / "adapters").iterdir() for v in n.iterdir() if v.name.isdigit()
    )
    assert on_disk == sorted(refs)
    assert set(registry.verify().values()) == {"ok"}
    json.dumps(registry.show("shared@4"))  # the card is plain JSON
