"""AdapterCache on its own (adopted adapters, LRU loads, leases that hold adapters past the budget) and
the Composer's public seams over it (resolve, tokenize, device, cache), which LoraHub composition uses."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LORA_TARGETS, batch, minilm_tokenizer, tiny

from adapters_mtl import AdapterModel, LoraConfig
from adapters_mtl.registry import AdapterRegistry
from adapters_mtl.serving.adapter_cache import AdapterCache, ComposerError, row_entries
from adapters_mtl.serving.composer import Composer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama and a registry holding LoRA adapters r1, r2, r3 of it."""
    base = tiny("llama").eval()
    registry = AdapterRegistry(tmp_path_factory.mktemp("reg"))
    trainer = AdapterModel(copy.deepcopy(base))
    torch.manual_seed(0)
    for i in (1, 2, 3):
        trainer.add_adapter(f"r{i}", LoraConfig(r=i, targets=LORA_TARGETS["llama"], init="random"))
        registry.publish(trainer, adapter=f"r{i}", task=f"r{i}")
    return base, registry


def _attached(base):
    model = AdapterModel(copy.deepcopy(base)).eval()
    torch.manual_seed(1)
    model.add_adapter("a", LoraConfig(r=2, targets=LORA_TARGETS["llama"], init="random"))
    model.add_adapter("b", LoraConfig(r=4, targets=LORA_TARGETS["llama"][:1], init="random"))
    return model


def test_adopted_adapters_resolve_by_name_and_are_never_evicted(world):
    base, registry = world
    cache = AdapterCache(_attached(base), registry, max_adapters=1)
    assert [(e["name"], e["ref"], e["pinned"]) for e in cache.loaded] == [
        ("a", "a", False),
        ("b", "b", False),
    ]
    assert cache.resolve_entries(["b", ("a", "b"), None]) == ["b", ("a", "b"), None]
    assert [e["name"] for e in cache.loaded] == ["b", "a"]  # the last one named is the most recent
    assert cache.ref("a") == "a" and not cache.from_registry("a")
    assert cache.resolve(["r1"]) == ["r1"] and cache.resolve(["r2"]) == ["r2"]  # budget 1: r1 goes
    assert [e["ref"] for e in cache.loaded] == ["b", "a", "r2@1"]  # adopted ones do not count
    assert cache.ref("r2") == "r2@1" and cache.from_registry("r2")
    assert cache.ref("untracked") == "untracked" and not cache.from_registry("untracked")


def test_a_lease_holds_its_adapters_past_the_budget_until_it_is_closed(world):
    base, registry = world
    model = AdapterModel(copy.deepcopy(base)).eval()
    cache = AdapterCache(model, registry, max_adapters=1)
    with cache.lock:  # resolve and hold in one step
        names = cache.resolve(["r1"])
        lease = cache.hold(names)
    assert cache.in_flight == 1
    assert cache.resolve(["r2"]) == ["r2"]  # over budget for a moment: r1 is held
    assert sorted(model.adapter_names) == ["r1", "r2"]
    with pytest.raises(ComposerError, match="'r1' is in use by 1 call"):
        cache.unload("r1")
    with lease:
        pass  # closing the lease meets the budget again, least recent first
    lease.close()  # closing twice changes nothing
    assert cache.in_flight == 0 and model.adapter_names == ["r2"]
    cache.pin("r3")
    with pytest.raises(ComposerError, match="cannot hold"):
        cache.load("r1")  # r3 pinned, budget 1
    assert [e["ref"] for e in cache.loaded] == ["r3@1"] and cache.loaded[0]["pinned"]


def test_without_a_registry_only_attached_adapters_resolve(world):
    base, _ = world
    cache = AdapterCache(_attached(base), None)
    with pytest.raises(ComposerError, match="'r1' is not attached and this composer has no registry"):
        cache.resolve(["a", "r1"])
    with pytest.raises(ComposerError, match=r"row 1: got int 3"):
        row_entries(["a", 3], 2)
    assert row_entries("a", 3) == ["a", "a", "a"] and row_entries(["a", None], 2) == ["a", None]


def test_composer_seams_resolve_tokenize_device_and_cache(world):
    base, registry = world
    tok = minilm_tokenizer()
    c = Composer(_attached(base), registry=registry, tokenizer=tok, max_adapters=2)
    assert c.cache.registry is c.registry is registry and c.max_adapters == c.cache.max_adapters == 2
    assert c.resolve(["r1", "a", "r2@1", "r1"]) == ["r1", "a", "r2", "r1"]
    assert c.resolve("r3") == ["r3"] and [e["ref"] for e in c.loaded] == ["b", "a", "r2@1", "r3@1"]
    with pytest.raises(ComposerError, match=r"row 1: got tuple \('a', 'b'\).*Expected registry references"):
        c.resolve(["a", ("a", "b")])
    assert c.cache.resolve_entries([("a", "r2"), None]) == [("a", "r2"), None]
    enc = c.tokenize(["hello there", "a longer text than that"], max_length=4)
    assert enc["input_ids"].shape == (2, 4) and enc["input_ids"].device == c.device
    with pytest.raises(ComposerError, match="has no tokenizer"):
        Composer(_attached(base), registry=None).tokenize(["x"])


def test_composer_merge_defaults_to_the_exact_cat_merge_for_any_ranks(world):
    """a has rank 2, b rank 4: ``linear`` would refuse them; the default equals the stack."""
    base, _ = world
    c = Composer(_attached(base), registry=None)
    assert c.merge(["a", "b"], weights=[0.5, 1.0], into="m") == "m"
    assert "m" in [e["name"] for e in c.loaded] and c.cache.ref("m") == "m"
    x = batch(2, 5)
    with torch.no_grad():
        half = c.merge(["a"], weights=[0.5], into="a_half")
        torch.testing.assert_close(
            c.model(**x, adapters="m").logits, c.model(**x, adapters=(half, "b")).logits, atol=1e-5, rtol=0
        )


def test_the_old_name_of_the_merge_methods_warns():
    from adapters_mtl.serving import merging

    with pytest.warns(DeprecationWarning, match="MERGE_METHODS"):
        assert merging.METHODS is merging.MERGE_METHODS
    assert merging.DEFAULT_MERGE_METHOD == "cat" and "cat" in merging.MERGE_METHODS
