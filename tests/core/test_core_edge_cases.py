"""Edge cases found in review: each was a real failure before its fix."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LORA_TARGETS, assert_rows_alone, batch, tiny

from adapters_mtl import AdapterModel, LoraConfig, PrefixConfig
from adapters_mtl.files.folder import base_fingerprint


def test_adapters_on_different_modules_and_layers_mix():
    model = AdapterModel(tiny("llama"))
    model.add_adapter("q", LoraConfig(r=2, targets=("q_proj",), init="random"))
    model.add_adapter("v", LoraConfig(r=4, targets=("v_proj",), init="random"))
    model.add_adapter("v2", LoraConfig(r=3, targets=("v_proj",), init="random", layers_to_transform=(1,)))
    model.add_adapter("d", LoraConfig(r=2, targets=("down_proj",), init="random", layers_to_transform=(0,)))
    for strategy in ("gather", "group", "segment"):
        model.routing_strategy = strategy
        assert_rows_alone(model, batch(5, 6), ["q", "v", "v2", "d", None], masked=False)


def test_each_row_gets_its_own_dropout_in_training():
    model = AdapterModel(tiny("llama"))
    model.add_adapter("calm", LoraConfig(r=4, targets=("q_proj",), init="random", dropout=0.0))
    model.add_adapter("noisy", LoraConfig(r=4, targets=("q_proj",), init="random", dropout=0.9))
    model.train()
    inputs = batch(2, 6)
    with torch.no_grad():
        alone = model(**{k: v[:1] for k, v in inputs.items()}, adapters="calm").logits[0]
        for strategy in ("gather", "group", "segment"):
            model.routing_strategy = strategy
            mixed = model(**inputs, adapters=["calm", "noisy"]).logits
            torch.testing.assert_close(mixed[0], alone, atol=1e-5, rtol=0)
    # and with autograd (the training path) too
    mixed = model(**inputs, adapters=["calm", "noisy"]).logits
    torch.testing.assert_close(mixed[0].detach(), alone, atol=1e-5, rtol=0)


def test_gradient_checkpointing_with_routing_is_refused_not_wrong():
    model = AdapterModel(tiny("llama"))
    model.add_adapter("a", LoraConfig(r=2, targets=("q_proj",), init="random"))
    model.add_adapter("b", LoraConfig(r=2, targets=("q_proj",), init="random"))
    model.base.activation_checkpointing_enable()
    model.train()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        model(**batch(2, 5), adapters=["a", "b"])
    with pytest.raises(NotImplementedError):
        model(**batch(2, 5), adapters="a")
    model.activate("a")
    loss = model(**batch(2, 5)).logits.pow(2).mean()  # the active LoRA is recomputed correctly
    loss.backward()
    assert all(p.grad is not None for p in model.adapter_parameters("a").values())


def test_deepcopy_and_assign_load_keep_the_stacks_in_sync():
    model = AdapterModel(tiny("llama"))
    model.add_adapter("a", LoraConfig(r=2, targets=LORA_TARGETS["llama"], init="random"))
    model.add_adapter("b", LoraConfig(r=3, targets=LORA_TARGETS["llama"], init="random"))
    twin = copy.deepcopy(model)
    twin.train()
    twin(**batch(2, 5), adapters=["a", "a"]).logits.pow(2).mean().backward()
    torch.optim.SGD(twin.trainable_parameters(), lr=1.0).step()
    twin.eval()
    assert_rows_alone(twin, batch(3, 5), ["a", "b", None], masked=False)
    other = AdapterModel(tiny("llama"))
    other.add_adapter("a", LoraConfig(r=2, targets=LORA_TARGETS["llama"]))
    other.add_adapter("b", LoraConfig(r=3, targets=LORA_TARGETS["llama"]))
    other.load_state_dict(twin.state_dict(), assign=True)
    assert_rows_alone(other, batch(3, 5), ["a", "b", None], masked=False)
    with torch.no_grad():
        x = batch(2, 5)
        torch.testing.assert_close(
            other(**x, adapters=["a", "b"]).logits, twin(**x, adapters=["a", "b"]).logits
        )


def test_re_adding_a_prefix_name_never_serves_the_old_prefix():
    model = AdapterModel(tiny("llama")).eval()
    inputs = batch(2, 5)
    model.add_adapter("p", PrefixConfig(num_virtual_tokens=3))
    for _ in range(10):
        with torch.no_grad():
            model(**inputs, adapters=["p", None])
        model.remove_adapter("p")
        model.add_adapter("p", PrefixConfig(num_virtual_tokens=3))
        assert_rows_alone(model, inputs, ["p", None], masked=False)
        with torch.no_grad():
            fresh = model(**inputs, adapters=["p", None]).logits[0]
            single = model(**inputs, adapters="p").logits[0]
        torch.testing.assert_close(fresh, single, atol=1e-5, rtol=0)


def test_gpt2_prefix_with_inputs_embeds():
    model = AdapterModel(tiny("gpt2")).eval()
    model.add_adapter("p", PrefixConfig(num_virtual_tokens=3))
    inputs = batch(2, 5)
    with torch.no_grad():
        embeds = model.base.get_input_embeddings()(inputs["input_ids"])
        a = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], adapters=["p", None]).logits
        b = model(**inputs, adapters=["p", None]).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_merge_then_convert_then_unmerge():
    model = AdapterModel(tiny("llama"))
    model.add_adapter("a", LoraConfig(r=2, targets=LORA_TARGETS["llama"], init="random"))
    inputs = batch(2, 5)
    with torch.no_grad():
        want = model(**inputs, adapters="a").logits.double()
        model.merge("a")
        model.to(torch.float64)
        model.unmerge()
        assert all(p.dtype == torch.float64 for p in model.base.parameters())
        torch.testing.assert_close(model(**inputs, adapters="a").logits, want, atol=1e-5, rtol=0)


def test_base_fingerprint_follows_the_weights():
    model = AdapterModel(tiny("llama"))
    model.add_adapter("a", LoraConfig(r=2, targets=("q_proj",), init="random"))
    first = base_fingerprint(model)
    assert base_fingerprint(model) == first
    model.merge("a")
    with pytest.raises(RuntimeError, match="merged"):
        base_fingerprint(model)
    model.unmerge()
    assert base_fingerprint(model) == first
    model.to(torch.float64)
    assert base_fingerprint(model) != first
    assert base_fingerprint(model) == base_fingerprint(AdapterModel(tiny("llama").to(torch.float64)))


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_peft_config_options_are_honoured_or_refused(family):
    import peft

    base = tiny(family)
    # a bare encoder (BertModel) has no output layer: all-linear targeted nothing there before
    for cfg in (
        *(
            [
                peft.LoraConfig(
                    r=2,
                    target_modules=["q_proj", "v_proj"],
                    exclude_modules=["model.layers.0.self_attn.q_proj"],
                )
            ]
            if family == "llama"
            else []
        ),
        peft.LoraConfig(r=2, target_modules="all-linear"),
    ):
        ref = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
        want = sorted(
            k.removeprefix("base_model.model.")
            for k, m in ref.named_modules()
            if hasattr(m, "lora_A") and len(m.lora_A)
        )
        ours = AdapterModel(copy.deepcopy(base))
        ours.add_adapter("x", cfg)
        assert sorted(ours.method("lora").targets["x"]) == want
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        AdapterModel(copy.deepcopy(base)).add_adapter(
            "y", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
        )


def test_base_fingerprint_is_computed_once_while_the_base_is_unchanged(monkeypatch):
    import hashlib  # the module the fingerprint hashes with (patched where it is, as before)

    model = AdapterModel(tiny("llama"))
    base_fingerprint(model)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: (calls.append(1), real(*a))[1])
    model.add_adapter("a", LoraConfig(r=2, targets=("q_proj",)))
    base_fingerprint(model)
    assert calls == []


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mixed", [False, True])
def test_fused_lora_update_equals_the_formula_forward_and_backward(base_dtype, mixed):
    """The update accumulated into the base output by addmm/baddbmm (alpha = scale) equals
    W·x + b + s·B·A·x with its gradients; a bf16 base with fp32 adapters takes the unfused path."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24).to(base_dtype)
    holder = torch.nn.Sequential(torch.nn.Identity(), base)
    from adapters_mtl.core.routing import Route
    from adapters_mtl.methods.lora_layer import LoraLayer

    route = Route()
    layer = LoraLayer(base, route)
    holder[1] = layer
    layer.add("a", slot=1, r=4, scaling=1.5, dropout=0.0, init="random")
    layer.add("b", slot=2, r=2, scaling=0.5, dropout=0.0, init="random")
    x = torch.randn(3, 5, 16, dtype=base_dtype)
    rows = ["a", "b", "a"] if mixed else ["a"] * 3
    slots = {"a": 1, "b": 2}
    from adapters_mtl.core.routing import slot_selection

    route.default = {**route.default, "lora": slot_selection(rows, slots, lambda: x.device)}
    layer.train()
    out = layer(x)
    ref = []
    for i, name in enumerate(rows):
        A, B = layer.lora_A[name], layer.lora_B[name]
        xi = x[i].to(A.dtype)
        ref.append(base(x[i]) + (xi @ A.T @ B.T * layer.scaling[name]).to(base_dtype))
    ref_t = torch.stack(ref)
    tol = 1e-5 if base_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref_t, atol=tol, rtol=tol)
    grads = torch.autograd.grad(out.float().pow(2).sum(), [layer.lora_A["a"], layer.lora_B["a"]])
    grads_ref = torch.autograd.grad(ref_t.float().pow(2).sum(), [layer.lora_A["a"], layer.lora_B["a"]])
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r, atol=tol * 10, rtol=tol)
