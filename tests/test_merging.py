"""merge_adapters: the ``cat`` merge is exact in ΔW space, keeps per-module ranks and rsLoRA scales, and
PEFT reads the result."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LORA_TARGETS, batch, tiny

from adapters_mtl import AdapterModel, HeadConfig, LoraConfig, PrefixConfig
from adapters_mtl.io import save_adapter
from adapters_mtl.merging import merge_adapters


def _model():
    base = tiny("llama")
    model = AdapterModel(copy.deepcopy(base)).eval()
    torch.manual_seed(1)
    t = LORA_TARGETS["llama"]
    model.add_adapter("shared", LoraConfig(r=4, alpha=8, targets=t, init="random", rank_pattern={t[0]: 2}))
    model.add_adapter("a", LoraConfig(r=2, alpha=4, targets=t[:1], init="random", use_rslora=True))
    model.add_adapter("p", PrefixConfig(num_virtual_tokens=2))
    return base, model


def test_cat_merge_is_the_weighted_sum_of_updates_and_equals_the_stack():
    _, model = _model()
    merge_adapters(model, ["shared", "a"], weights=[0.5, -2.0], into="m")
    lora = model._methods["lora"]
    for path in lora.targets["m"]:
        layer = lora.layers[path]
        want = 0.5 * layer.delta_weight("shared")
        if path in lora.targets["a"]:
            want = want - 2.0 * layer.delta_weight("a")
        torch.testing.assert_close(layer.delta_weight("m"), want, atol=1e-6, rtol=0)
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
    import peft

    base, model = _model()
    merge_adapters(model, ["shared", "a"], weights=[1.0, 0.7], into="m")
    save_adapter(model, "m", tmp_path / "m")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "m")).eval()
    x = batch(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(ref(**x).logits, model(**x, adapters="m").logits, atol=1e-5, rtol=0)


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
