"""Stacks: a row routed through a shared adapter and its task adapter at once ("shared + task")."""

from __future__ import annotations

import pytest
import torch
from helpers import LORA_TARGETS, batch, tiny

from adapters_mtl import AdapterModel, HeadConfig, LoraConfig, PrefixConfig


def _model(family="llama"):
    model = AdapterModel(tiny(family)).eval()
    torch.manual_seed(1)
    targets = LORA_TARGETS[family]
    model.add_adapter("shared", LoraConfig(r=4, alpha=8, targets=targets, init="random"))
    model.add_adapter("a", LoraConfig(r=2, alpha=4, targets=targets[:1], init="random", use_rslora=True))
    model.add_adapter("b", LoraConfig(r=3, alpha=3, targets=targets, init="random"))
    model.add_adapter("p", PrefixConfig(num_virtual_tokens=3))
    return model


def test_stacked_rows_equal_the_same_rows_alone():
    model = _model()
    names = [("shared", "a"), ("shared", "b"), "shared", None, ("shared", "p"), ("a", "b")]
    inputs = batch(len(names), 6, pad="left")
    with torch.no_grad():
        mixed = model(**inputs, adapters=names).logits
        for i, name in enumerate(names):
            alone = model(**{k: v[i : i + 1] for k, v in inputs.items()}, adapters=[name]).logits[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
        assert (mixed[0] - model(**inputs, adapters="a").logits[0]).abs().max() > 1e-4


def test_a_stack_equals_one_adapter_with_concatenated_ranks():
    """ΔW = s1·B1·A1 + s2·B2·A2 = [s1·B1, s2·B2]·[A1; A2]: one rank-(r1+r2) adapter with scale 1."""
    model = _model()
    model.add_adapter("sum", LoraConfig(r=7, alpha=7, targets=LORA_TARGETS["llama"], init="zeros"))
    lora = model.method("lora")
    with torch.no_grad():
        for path in lora.targets["sum"]:
            layer = lora.layers[path]
            for name, lo, hi in (("shared", 0, 4), ("b", 4, 7)):
                layer.lora_A["sum"][lo:hi] = layer.lora_A[name]
                layer.lora_B["sum"][:, lo:hi] = layer.lora_B[name] * layer.scaling[name]
        inputs = batch(3, 5)
        torch.testing.assert_close(
            model(**inputs, adapters=("shared", "b")).logits,
            model(**inputs, adapters="sum").logits,
            atol=1e-5,
            rtol=0,
        )


def test_stacked_training_reaches_shared_and_task_adapters_and_heads():
    model = AdapterModel(tiny("bert"))
    model.add_adapter("shared", LoraConfig(r=2, targets=("query",), init="random"))
    model.add_adapter(
        "news", LoraConfig(r=2, targets=("value",), init="random"), head=HeadConfig(num_labels=3)
    )
    model.add_adapter(
        "tone", LoraConfig(r=2, targets=("value",), init="random"), head=HeadConfig(num_labels=2)
    )
    model.train()
    out = model(**batch(4, 5), adapters=[("shared", "news"), ("shared", "tone"), ("shared", "news"), "news"])
    assert out.heads["news"].rows.tolist() == [0, 2, 3] and out.heads["tone"].rows.tolist() == [1]
    sum(h.logits.pow(2).sum() for h in out.heads.values()).backward()
    for name in ("shared", "news", "tone"):
        grads = [p.grad for p in model.adapter_parameters(name).values()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_stack_errors():
    model = _model()
    model.add_adapter("p2", PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="at most one prefix adapter"):
        model(**batch(1, 4), adapters=[("p", "p2")])
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['nope'\]"):
        model(**batch(1, 4), adapters=[("shared", "nope")])
    model.activate(("shared", "a"))  # a stack can be the active adapter too
    with torch.no_grad():
        x = batch(2, 4)
        torch.testing.assert_close(
            model(**x).logits, model(**x, adapters=("shared", "a")).logits, atol=0, rtol=0
        )
