"""Resolving from memory while a local name's files are unchanged (issue 15): no listing and no SQLite per
load, and every change another process makes (publish, alias, remove, damage) still seen."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from helpers import make_config, tiny

from adapters_mtl import AdapterModel
from adapters_mtl.files.folder import AdapterFileError, load_adapter
from adapters_mtl.registry import AdapterRegistry, RegistryError
from adapters_mtl.registry import adapter_registry as ar

SETTLE_S = 0.12  # the test's settling time (the default is 2 s)


@pytest.fixture(autouse=True)
def short_settling(monkeypatch):
    monkeypatch.setattr(ar, "SETTLED_NS", int(SETTLE_S / 2 * 1e9))


@pytest.fixture
def base():
    return tiny("bert", seed=4)


def _model(base, seed=0):
    model = AdapterModel(copy.deepcopy(base)).eval()
    torch.manual_seed(seed)
    model.add_adapter("news", make_config("lora", "bert", 0))
    return model


def _settle():
    time.sleep(SETTLE_S)


def test_a_settled_name_resolves_without_listing_or_sqlite(base, tmp_path, monkeypatch):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.publish(_model(base), adapter="news")
    _settle()
    assert reg.resolve("news").version == 1  # looks once

    def refuse(*_a, **_k):
        pytest.fail("the catalog or the store was read")

    for what in ("rows", "aliases", "problems"):
        monkeypatch.setattr(reg.catalog, what, refuse)
    monkeypatch.setattr(reg.store, "versions", refuse)
    target = AdapterModel(copy.deepcopy(base)).eval()
    for i in range(3):
        assert reg.resolve("news@1").ref == "news@1"
        reg.load(target, "news", name=f"n{i}")
    assert target.adapter_names == ["n0", "n1", "n2"]


def test_a_young_name_is_always_listed_again(base, tmp_path, monkeypatch):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.publish(_model(base), adapter="news")
    monkeypatch.setattr(ar, "SETTLED_NS", 3600 * 10**9)  # nothing is ever settled
    calls = []
    real = reg.store.versions
    monkeypatch.setattr(reg.store, "versions", lambda name: calls.append(name) or real(name))
    for _ in range(3):
        reg.resolve("news")
    assert calls == ["news"] * 3


def test_changes_by_another_process_are_seen(base, tmp_path):
    root = tmp_path / "reg"
    ours = AdapterRegistry(root)
    other = AdapterRegistry(root, catalog=tmp_path / "other.sqlite")  # another process: its own catalog
    other.publish(_model(base), adapter="news")
    _settle()
    assert ours.resolve("news").version == 1
    other.publish(_model(base, seed=1), adapter="news", aliases=["prod"])
    _settle()
    assert ours.resolve("news").version == 2
    assert ours.resolve("news@prod").version == 2
    other.set_alias("news@1", "prod")
    _settle()
    assert ours.resolve("news@prod").version == 1
    other.remove("news@2")
    _settle()
    assert ours.resolve("news").version == 1
    with pytest.raises(RegistryError, match="no version 2"):
        ours.resolve("news@2")
    # aliases.json edited in place (no rename in the name's folder)
    (root / "adapters" / "news" / "aliases.json").write_text('{"prod": 1, "beta": 1}')
    _settle()
    assert ours.resolve("news@beta").version == 1


def test_a_version_damaged_after_it_was_resolved_is_never_loaded(base, tmp_path):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.publish(_model(base), adapter="news")
    _settle()
    rec = reg.resolve("news")
    target = AdapterModel(copy.deepcopy(base)).eval()
    reg.load(target, "news", name="ok")
    # the card removed in place: the name's folder does not change, so the resolve is answered from
    # memory; without the card the folder would read as a plain PEFT folder (no checksums, no fingerprint)
    (tmp_path / "reg" / "adapters" / "news" / "1" / "adapter_card.json").unlink()
    assert reg.resolve("news").ref == rec.ref
    with pytest.raises(AdapterFileError, match="no adapter_card.json"):
        reg.load(target, "news", name="bad")
    with pytest.raises(AdapterFileError, match="no adapter_card.json"):
        reg.fetch("news@1")
    assert "no adapter_card.json" in reg.verify("news@1")["news@1"]
    assert target.adapter_names == ["ok"]


def test_load_adapter_require_card(base, tmp_path):
    model = _model(base)
    from adapters_mtl.files.folder import save_adapter

    folder = save_adapter(model, "news", tmp_path / "a")
    (folder / "adapter_card.json").unlink()
    target = AdapterModel(copy.deepcopy(base)).eval()
    with pytest.raises(AdapterFileError, match="no adapter_card.json"):
        load_adapter(target, folder, name="x", require_card=True)
    assert target.adapter_names == []
    assert load_adapter(target, folder, name="x") == "x"  # a plain PEFT folder still loads by default
