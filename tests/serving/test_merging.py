"""merge_adapters: the ``cat`` merge is exact in ΔW space, keeps per-module ranks and rsLoRA scales, and
PEFT reads the result."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LORA_TARGETS, batch, tiny

from adapters_mtl import AdapterModel, HeadConfig, LoraConfig, PrefixConfig
from adapters_mtl.files.folder import save_adapter
from adapters_mtl.serving.merging import merge_adapters


def _model():
    base = tiny("llama")
    model = AdapterModel(copy.deepcopy(base)).eval()
    torch.manual_seed(1)
    t = LORA_TARGETS["llama"]
    model.add_adapter("shared", LoraConfig(r=4, alpha=8, targets=t, init="random", rank_pattern={t[0]: 2}))
    model.add_adapter("a", LoraConfig(r=2, alpha=4, targets=t[:1], init="random", use_rslora=True))
    model.add_adapter("p", PrefixConfig(num_virtual_tokens=2))
    return base, model


def _assert_peft_reads(base, model, name, tmp_path):
    """PEFT loads the saved adapter ``name`` and computes what we compute."""
    import peft

    save_adapter(model, name, tmp_path / name)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / name)).eval()
    x = batch(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(ref(**x).logits, model(**x, adapters=name).logits, atol=1e-5, rtol=0)


def _deltas(model, name):
    """ΔW = s·B·A of every module ``name`` targets, from its public factors."""
    return {path: scale * (B @ A) for path, (A, B, scale) in model.factors(name).items()}


def test_cat_merge_is_the_weighted_sum_of_updates_and_equals_the_stack():
    _, model = _model()
    merge_adapters(model, ["shared", "a"], weights=[0.5, -2.0], into="m")  # cat: the default
    shared, a, merged = _deltas(model, "shared"), _deltas(model, "a"), _deltas(model, "m")
    assert set(merged) == set(shared) | set(a)
    for path, got in merged.items():
        want = 0.5 * shared[path]
        if path in a:
            want = want - 2.0 * a[path]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    merge_adapters(model, ["shared", "a"], into="sum")
    x = batch(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**x, adapters="sum").logits, model(**x, adapters=("shared", "a")).logits, atol=1e-5, rtol=0
        )
        merge_adapters(model, ["shared", "shared"], weights=[1.0, -1.0], into="zero")  # weights sum to 0
        torch.testing.assert_close(
            model(**x, adapters="zero").logits, model(**x, adapters=None).logits, atol=1e-5, rtol=0
        )


def test_peft_loads_a_cat_merge_with_per_module_ranks(tmp_path):

    base, model = _model()
    merge_adapters(model, ["shared", "a"], weights=[1.0, 0.7], into="m")
    _assert_peft_reads(base, model, "m", tmp_path)


def test_bad_merges_leave_the_model_unchanged():
    _, model = _model()
    model.add_adapter("h", LoraConfig(r=2, targets=LORA_TARGETS["llama"]), head=HeadConfig(num_labels=3))
    before = list(model.adapter_names)
    with pytest.raises(ValueError, match=r"got 1 weights for 2 adapters"):
        merge_adapters(model, ["shared", "a"], weights=[1.0], into="m")
    with pytest.raises(ValueError, match=r"only LoRA adapters can be merged; \['p'\]"):
        merge_adapters(model, ["shared", "p"], into="m")
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['nope'\]"):
        merge_adapters(model, ["shared", "nope"], into="m")
    with pytest.raises(ValueError, match="already exists"):
        merge_adapters(model, ["shared", "a"], into="a")
    assert model.adapter_names == before
    merge_adapters(model, ["shared", "h"], into="m")  # the head of the last adapter that has one
    torch.testing.assert_close(model.heads["m"].state_dict(), model.heads["h"].state_dict())


def test_compact_frees_spare_capacity_and_keeps_values_and_parameters():
    _, model = _model()
    for i in range(5):
        model.add_adapter(f"x{i}", LoraConfig(r=2, targets=LORA_TARGETS["llama"], init="random"))
    model.remove_adapter("x4")
    x = batch(2, 5)
    params = model.adapter_parameters("x1")
    opt = torch.optim.SGD(list(params.values()), lr=0.1)
    with torch.no_grad():
        before = model(**x, adapters=["x1", ("shared", "x3")]).logits
    lora = model.method("lora")
    layers = lora.layers.values()
    size = sum(layer.stack_A.numel() + layer.stack_B.numel() for layer in layers)
    model.compact()
    assert sum(layer.stack_A.numel() + layer.stack_B.numel() for layer in layers) < size
    # every slot up to the highest one in use, and no more (slot 0 = no LoRA)
    assert all(layer.stack_A.shape[0] == max(lora.slot.values()) + 1 for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**x, adapters=["x1", ("shared", "x3")]).logits, before, atol=0, rtol=0
        )
    model(**x, adapters="x1").logits.sum().backward()  # the optimiser's parameters still train the adapter
    opt.step()
    assert model.adapter_parameters("x1") == params
    with torch.no_grad():
        assert not torch.equal(model(**x, adapters=["x1", ("shared", "x3")]).logits, before)


@pytest.mark.parametrize(
    "method,atol",
    [
        ("cat", 1e-7),
        ("linear", 1e-7),
        ("svd", 1e-5),
        ("ties", 1e-5),
        ("dare_linear", 1e-5),
        ("dare_ties", 1e-5),
        ("magnitude_prune", 1e-5),
    ],
)
def test_merging_one_adapter_with_weight_one_returns_it(method, atol):
    """rsLoRA and per-module ranks included (PEFT #3737/#3761); density 1 keeps every value."""
    _, model = _model()
    merge_adapters(model, ["shared"], method=method, into="m", density=1.0)
    want, got = _deltas(model, "shared"), _deltas(model, "m")
    assert set(got) == set(want)
    for path in want:
        torch.testing.assert_close(got[path], want[path], atol=atol, rtol=0)
    merge_adapters(model, ["a"], method=method, into="m2")  # rsLoRA scale s = alpha / sqrt(r)
    for path, d in _deltas(model, "a").items():
        torch.testing.assert_close(_deltas(model, "m2")[path], d, atol=atol, rtol=0)


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_weights_that_sum_to_zero_give_the_base(method):
    _, model = _model()
    merge_adapters(model, ["shared", "shared"], weights=[0.3, -0.3], method=method, into="z")
    x = batch(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**x, adapters="z").logits, model(**x, adapters=None).logits, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("method", ["svd", "ties", "dare_ties"])
def test_svd_based_merges_of_two_adapters_reload_in_peft(tmp_path, method):

    base, model = _model()
    merge_adapters(model, ["shared", "a"], weights=[0.6, 0.4], method=method, into="m", density=0.5, rank=3)
    assert all(A.shape[0] == B.shape[1] <= 3 for A, B, _ in model.factors("m").values())
    if method == "svd":  # rank 3 of a sum of ranks ≤ 4 + 2: close to Σ w_i ΔW_i, not equal
        exact = merge_adapters(model, ["shared", "a"], weights=[0.6, 0.4], method="cat", into="exact")
        full = merge_adapters(model, ["shared", "a"], weights=[0.6, 0.4], method="svd", into="full", rank=6)
        for path, d in _deltas(model, exact).items():
            torch.testing.assert_close(_deltas(model, full)[path], d, atol=1e-5, rtol=0)
    _assert_peft_reads(base, model, "m", tmp_path)


def test_linear_refuses_different_ranks():
    _, model = _model()
    model.add_adapter("b", LoraConfig(r=3, targets=LORA_TARGETS["llama"], init="random"))
    with pytest.raises(
        ValueError, match="method 'linear' combines A and B factor by factor, so ranks must match"
    ):
        merge_adapters(model, ["shared", "b"], method="linear", into="m")
    assert "m" not in model.adapter_names


def test_swapping_adapters_of_a_compiled_model_does_not_recompile():
    from torch._dynamo.testing import CompileCounter

    torch.compiler.reset()
    _, model = _model()
    model.add_adapter("b", LoraConfig(r=3, targets=LORA_TARGETS["llama"], init="random"))
    model.static_routing(True)
    counter = CompileCounter()
    compiled = torch.compile(model.base, backend=counter)
    x = batch(2, 5)
    with torch.no_grad():
        for name in ["shared", "a", "b", None, "shared"]:
            model.activate(name)
            got = compiled(**x).logits
            torch.testing.assert_close(got, model(**x, adapters=name).logits, atol=1e-5, rtol=0)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 5 swaps"
    torch.compiler.reset()
    model.static_routing(False)  # the ordinary path specialises on the slot: a recompile per adapter
    counter = CompileCounter()
    compiled = torch.compile(model.base, backend=counter)
    with torch.no_grad():
        for name in ["shared", "a", "b"]:
            model.activate(name)
            compiled(**x)
    assert counter.frame_count > 1
    torch.compiler.reset()
