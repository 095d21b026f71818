"""The fast load paths (issue 15) keep every check: the base fingerprint's cache, the one-pass finite-value
check, the cached LoRA target matching and the train/eval walk of an attach."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LORA_TARGETS, tiny
from safetensors.torch import save, save_file
from torch import nn

from adapters_mtl import AdapterModel, LoraConfig
from adapters_mtl.files.fingerprint import base_fingerprint
from adapters_mtl.files.folder import AdapterFileError, load_adapter, save_adapter
from adapters_mtl.files.safe_read import parse_tensors
from adapters_mtl.methods.lora import LoraMethod


def _cfg(init: str = "zeros") -> LoraConfig:
    return LoraConfig(r=4, targets=LORA_TARGETS["llama"], init=init)


@pytest.fixture
def model() -> AdapterModel:
    return AdapterModel(tiny("llama", seed=3)).eval()


# ---------------------------------------------------------------------------- base fingerprint
def test_fingerprint_cache_check_never_lists_adapter_parameters(model, monkeypatch):
    # the cache check ran over named_parameters(), which lists every adapter's factors in every layer
    # (30 ms a load with 64 SmolLM2 adapters); it must be flat in the number of adapters
    for i in range(5):
        model.add_adapter(f"a{i}", _cfg(), trainable=False)
    first = base_fingerprint(model)
    seen = []
    real = nn.Module.named_parameters

    def counting(self, *a, **kw):
        seen.append(type(self).__name__)
        return real(self, *a, **kw)

    for i in range(5, 10):
        model.add_adapter(f"a{i}", _cfg(), trainable=False)
        with monkeypatch.context() as m:
            m.setattr(nn.Module, "named_parameters", counting)
            assert base_fingerprint(model) == first
    assert seen == []


def test_fingerprint_follows_every_change_of_the_base(model):
    model.add_adapter("a", _cfg("random"))
    before = base_fingerprint(model)
    fresh = AdapterModel(tiny("llama", seed=3)).eval()
    assert base_fingerprint(fresh) == before  # adapters attached do not change it
    layer = model.base.model.layers[0]
    value = layer.mlp.up_proj.weight[0, 0].item()
    with torch.no_grad():  # edited in place
        layer.mlp.up_proj.weight[0, 0] = value + 1
    assert base_fingerprint(model) != before
    with torch.no_grad():
        layer.mlp.up_proj.weight[0, 0] = value
    assert base_fingerprint(model) == before
    # a parameter replaced on its module (same module objects)
    old = layer.mlp.up_proj.weight
    layer.mlp.up_proj.weight = nn.Parameter(old.detach() * 2, requires_grad=False)
    assert base_fingerprint(model) != before
    layer.mlp.up_proj.weight = old
    assert base_fingerprint(model) == before
    # a module replaced by another with other weights
    other = copy.deepcopy(layer.mlp)
    with torch.no_grad():
        other.up_proj.weight.mul_(3)
    layer.mlp, kept = other, layer.mlp
    assert base_fingerprint(model) != before
    layer.mlp = kept
    assert base_fingerprint(model) == before
    # a parameter added to a module that had none of its own
    layer.mlp.register_parameter("extra", nn.Parameter(torch.ones(3), requires_grad=False))
    assert base_fingerprint(model) != before


def test_a_mismatched_base_is_refused_with_many_adapters_attached(model, tmp_path):
    model.add_adapter("src", _cfg("random"))
    folder = save_adapter(model, "src", tmp_path / "src")
    other = AdapterModel(tiny("llama", seed=4)).eval()
    for i in range(20):
        other.add_adapter(f"a{i}", _cfg(), trainable=False)
    base_fingerprint(other)  # cached
    with pytest.raises(AdapterFileError, match="base weights differ"):
        load_adapter(other, folder, name="src")
    assert "src" not in other.adapter_names


# ---------------------------------------------------------------------------- finite values
def _bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_nonfinite_value_anywhere_is_refused_and_named(dtype, bad):
    tensors = {f"t{i}": torch.randn(3, 5).to(dtype) for i in range(6)}
    tensors["t4"][2, 1] = bad
    with pytest.raises(AdapterFileError, match=r"\['t4'\] hold NaN or Inf"):
        parse_tensors(_bytes(tensors), "x")


def test_mixed_dtypes_and_bad_dtypes_still_report_every_problem():
    tensors = {"a": torch.randn(4), "b": torch.randn(4).half(), "i": torch.arange(3)}
    tensors["b"][0] = float("nan")
    with pytest.raises(AdapterFileError) as e:
        parse_tensors(_bytes(tensors), "x")
    assert "['i'] have dtype torch.int64" in str(e.value) and "['b'] hold NaN" in str(e.value)
    del tensors["i"]
    with pytest.raises(AdapterFileError, match=r"\['b'\] hold NaN"):
        parse_tensors(_bytes(tensors), "x")


def test_finite_values_whose_sum_overflows_are_accepted():
    big = torch.full((4,), 3e38)  # finite; their float32 sum is inf
    assert set(parse_tensors(_bytes({"a": big, "b": big.clone()}), "x")) == {"a", "b"}
    half = torch.full((8,), 60000.0).half()
    assert set(parse_tensors(_bytes({"h": half}), "x")) == {"h"}


def test_a_clean_file_is_checked_in_one_pass(monkeypatch):
    # one isfinite per tensor cost ~7 ms for SmolLM2's 120 tensors; a clean file needs none
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(1) or real(t))
    parse_tensors(_bytes({f"t{i}": torch.randn(8, 16) for i in range(50)}), "x")
    assert calls == []


def test_load_adapter_refuses_a_nan_weight_on_disk(model, tmp_path):
    model.add_adapter("src", _cfg("random"))
    folder = save_adapter(model, "src", tmp_path / "src", overwrite=True)
    target = AdapterModel(tiny("llama", seed=3)).eval()
    load_adapter(target, folder, name="ok")  # untouched: loads
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = sorted(state)[3]
    state[key][0, 0] = float("nan")
    save_file(state, str(weights))
    card = (folder / "adapter_card.json").read_text()
    import hashlib
    import json

    data = json.loads(card)
    data["files"]["adapter_model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / "adapter_card.json").write_text(json.dumps(data))  # checksums valid: only the values are bad
    with pytest.raises(AdapterFileError, match="hold NaN or Inf"):
        load_adapter(target, folder, name="bad")
    assert target.adapter_names == ["ok"]


# ---------------------------------------------------------------------------- target matching
def test_a_second_adapter_with_the_same_targets_is_not_matched_again(model, monkeypatch):
    model.add_adapter("a", _cfg())
    calls = []
    real = LoraMethod._match_uncached  # noqa: SLF001
    monkeypatch.setattr(LoraMethod, "_match_uncached", lambda self, c: calls.append(1) or real(self, c))
    model.add_adapter("b", _cfg())
    model.add_adapter("c", _cfg("random"))
    assert calls == []
    model.add_adapter("d", LoraConfig(r=2, targets=("o_proj",)))  # other targets: matched
    assert len(calls) == 1
    assert model.method("lora").targets["b"] == model.method("lora").targets["a"]


def test_cached_targets_follow_a_new_module(model):
    model.add_adapter("a", _cfg())
    layers = model.base.model.layers
    n = len(layers)
    layers.append(copy.deepcopy(tiny("llama", seed=3).model.layers[0]))  # new paths, plain Linear layers
    model.add_adapter("b", _cfg("random"))
    # a match cached without looking at the modules would leave the new layer out
    new = {p for p in model.method("lora").targets["b"] if p.startswith(f"model.layers.{n}.")}
    assert new == {
        f"model.layers.{n}.self_attn.q_proj",
        f"model.layers.{n}.self_attn.v_proj",
        f"model.layers.{n}.mlp.down_proj",
    }
    assert type(layers[n].self_attn.q_proj).__name__ == "LoraLayer"
    assert "b" in layers[n].self_attn.q_proj.lora_A


@pytest.mark.parametrize("training", [False, True])
def test_an_attached_adapter_follows_the_model_mode(training):
    model = AdapterModel(tiny("llama", seed=3)).train(training)
    model.add_adapter("a", _cfg())
    assert {m.training for m in model.modules()} == {training}
