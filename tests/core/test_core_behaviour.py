"""Heads, generation with a KV cache, activation, errors and dtype handling of AdapterModel."""

from __future__ import annotations

import pytest
import torch
from helpers import LORA_TARGETS, batch, tiny

from adapters_mtl import AdapterModel, HeadConfig, LoraConfig, PrefixConfig


def _lora(family, r=4):
    return LoraConfig(r=r, targets=LORA_TARGETS[family], init="random")


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_mixed_heads_each_row_uses_its_own_head(family):
    model = AdapterModel(tiny(family))
    torch.manual_seed(3)
    model.add_adapter("topic", _lora(family), head=HeadConfig(kind="seq_cls", num_labels=5, pooling="mean"))
    model.add_adapter(
        "score", PrefixConfig(num_virtual_tokens=4), head=HeadConfig(kind="regression", num_labels=1)
    )
    model.add_adapter(
        "tags",
        [_lora(family, 2), PrefixConfig(num_virtual_tokens=2)],
        head=HeadConfig(kind="token_cls", num_labels=3),
    )
    model.add_adapter("plain", _lora(family))  # no head
    model.eval()
    names = ["topic", "score", "tags", "plain", "topic", None]
    inputs = batch(len(names), 8, pad="right" if family == "bert" else "left")
    with torch.no_grad():
        out = model(**inputs, adapters=names)
        assert [tuple(x.shape) if x is not None else None for x in out.row_logits] == [
            (5,),
            (1,),
            (8, 3),
            None,
            (5,),
            None,
        ]
        assert out.heads["topic"].rows.tolist() == [0, 4]
        for i, name in enumerate(names):
            if name not in model.heads:
                continue
            alone = model(**{k: v[i : i + 1] for k, v in inputs.items()}, adapters=name).row_logits[0]
            valid = inputs["attention_mask"][i].bool() if alone.dim() == 2 else slice(None)
            torch.testing.assert_close(out.row_logits[i][valid], alone[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_routed_generate_equals_alone_and_cache_is_consistent(family):
    model = AdapterModel(tiny(family))
    torch.manual_seed(5)
    model.add_adapter("l", LoraConfig(r=4, targets=LORA_TARGETS[family], init="random", alpha=64))
    model.add_adapter("p", PrefixConfig(num_virtual_tokens=4, init_std=3.0))
    model.add_adapter(
        "lp",
        [
            LoraConfig(r=2, targets=LORA_TARGETS[family], init="random", alpha=64),
            PrefixConfig(num_virtual_tokens=6),
        ],
    )
    names = ["l", "p", None, "lp"]
    inputs = batch(len(names), 6, pad="left")
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(**inputs, adapters=names, **kw)
        no_cache = model.generate(**inputs, adapters=names, use_cache=False, **kw)
        assert torch.equal(mixed, no_cache), "KV-cache generation differs from recomputation"
        outs = set()
        for i, name in enumerate(names):
            alone = model.generate(**{k: v[i : i + 1] for k, v in inputs.items()}, adapters=name, **kw)
            # the lone row has the same left padding, so the sequences are directly comparable
            assert torch.equal(mixed[i], alone[0]), f"row {i} ({name}) differs when generated alone"
            outs.add(tuple(alone[0, -5:].tolist()))
        assert len(outs) > 1, "adapters had no effect on generation"
        # beam search repeats each row num_beams times; the routing repeats with them
        beams = model.generate(**inputs, adapters=names, num_beams=3, **kw)
        for i, name in enumerate(names):
            alone = model.generate(
                **{k: v[i : i + 1] for k, v in inputs.items()}, adapters=name, num_beams=3, **kw
            )
            assert torch.equal(beams[i], alone[0]), f"beam search row {i} ({name}) differs when run alone"


def test_activate_is_constant_time_and_plain_calls_use_it(monkeypatch):
    model = AdapterModel(tiny("llama"))
    for i in range(6):
        model.add_adapter(
            f"a{i}", [_lora("llama"), PrefixConfig(num_virtual_tokens=2)] if i % 2 else _lora("llama")
        )
    inputs = batch(3, 5)
    with torch.no_grad():
        routed = model(**inputs, adapters="a3").logits
        for name in model.adapter_names:  # warm the per-name cache
            model.activate(name)

        def boom(*_args, **_kwargs):
            raise AssertionError("activate() walked the module tree")

        monkeypatch.setattr(torch.nn.Module, "modules", boom)
        monkeypatch.setattr(torch.nn.Module, "named_modules", boom)
        model.activate("a3")
        monkeypatch.undo()
        torch.testing.assert_close(model(**inputs).logits, routed, atol=0, rtol=0)
        torch.testing.assert_close(
            model.base(**inputs).logits, routed, atol=0, rtol=0
        )  # direct base calls too
        model.activate(None)
        bare = model(**inputs, adapters=None).logits
        torch.testing.assert_close(model(**inputs).logits, bare, atol=0, rtol=0)
        assert (bare - routed).abs().max() > 1e-4


def test_remove_adapter_frees_it_and_keeps_the_others():
    model = AdapterModel(tiny("gpt2"))
    model.add_adapter("a", _lora("gpt2"))
    model.add_adapter("b", [_lora("gpt2"), PrefixConfig(num_virtual_tokens=3)], head=HeadConfig(num_labels=2))
    model.add_adapter("c", _lora("gpt2"))
    inputs = batch(2, 5)
    with torch.no_grad():
        before = model(**inputs, adapters="c").logits
        model.activate("b")
        model.remove_adapter("b")
        assert model.adapter_names == ["a", "c"] and model.active_adapter is None and "b" not in model.heads
        torch.testing.assert_close(model(**inputs, adapters="c").logits, before, atol=0, rtol=0)
        model.add_adapter("d", _lora("gpt2"))  # reuses the freed slot
        torch.testing.assert_close(model(**inputs, adapters="c").logits, before, atol=0, rtol=0)


def test_dtype_conversion_keeps_adapters_consistent():
    model = AdapterModel(tiny("llama"))
    model.add_adapter("a", _lora("llama"))
    model.add_adapter("b", _lora("llama"))
    inputs = batch(2, 5)
    with torch.no_grad():
        ref = model(**inputs, adapters=["a", "b"]).logits.double()
        model.to(torch.float64)
        mixed = model(**inputs, adapters=["a", "b"]).logits
        assert mixed.dtype == torch.float64
        torch.testing.assert_close(mixed, ref, atol=1e-5, rtol=0)
        # a parameter edit is visible to the stacked (gather) path after the conversion
        model.adapter_parameters("a")["model.layers.0.self_attn.q_proj.lora_B"].add_(1.0)
        one = model(**inputs, adapters="a").logits[0]
        torch.testing.assert_close(model(**inputs, adapters=["a", "b"]).logits[0], one, atol=1e-8, rtol=0)


# ----------------------------------------------------------------------------- errors
def test_bad_input_errors_are_clear():
    model = AdapterModel(tiny("bert"))
    model.add_adapter("news", _lora("bert"))
    inputs = batch(3, 5)
    with pytest.raises(
        KeyError, match=r"unknown adapter\(s\) \['nope', 'nope2'\].*attached adapters: \['news'\]"
    ):
        model(**inputs, adapters=["news", "nope", "nope2"])
    with pytest.raises(ValueError, match="adapters has 2 entries but the batch has 3 rows"):
        model(**inputs, adapters=["news", None])
    with pytest.raises(ValueError, match=r"match no Linear/Conv1D.*Near matches: \['query'\]"):
        model.add_adapter("bad", LoraConfig(targets=("querry",)))
    assert model.adapter_names == ["news"]  # nothing half-attached
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("news", _lora("bert"))
    with pytest.raises(ValueError, match="invalid adapter name"):
        model.add_adapter("../evil", _lora("bert"))
    with pytest.raises(ValueError, match="r must be a positive int"):
        LoraConfig(r=0)
    with pytest.raises(TypeError, match="unsupported adapter config dict"):
        model.add_adapter("x", {"r": 8})
    with pytest.raises(KeyError, match="unknown adapter"):
        model.activate("nope")


def test_prefix_on_unsupported_architecture_is_refused():
    base = tiny("bert")
    for m in base.modules():
        if type(m).__name__ == "BertSelfAttention":
            m.layer_idx = None  # an architecture whose attention layers are not addressable
    model = AdapterModel(base)
    with pytest.raises(ValueError, match="prefix tuning is not supported on BertModel"):
        model.add_adapter("p", PrefixConfig(num_virtual_tokens=4))
    assert model.adapter_names == []


def test_peft_configs_are_accepted():
    import peft

    model = AdapterModel(tiny("llama"))
    model.add_adapter("l", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("p", peft.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))
    (lora,) = model.adapter_config("l")
    assert (lora.r, lora.alpha, lora.targets) == (4, 8, ("q_proj", "v_proj"))
    model.add_adapter("d", peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))  # DoRA is LoRA's
    assert model.adapter_config("d")[0].use_dora
    with pytest.raises(ValueError, match="lora_bias"):  # options we do not implement are still refused
        model.add_adapter("b", peft.LoraConfig(r=4, lora_bias=True, target_modules=["q_proj"]))


def test_adapters_added_after_eval_are_in_eval_mode():
    model = AdapterModel(tiny("bert")).eval()
    model.add_adapter(
        "a", LoraConfig(r=4, targets=("query",), dropout=0.5), head=HeadConfig(num_labels=3, dropout=0.5)
    )
    assert not any(m.training for m in model.modules())
    inputs = batch(2, 5)
    with torch.no_grad():
        first = model(**inputs, adapters="a").row_logits[0]
        torch.testing.assert_close(model(**inputs, adapters="a").row_logits[0], first, atol=0, rtol=0)


def test_lora_on_tied_lm_head_merges_without_touching_the_embeddings():
    model = AdapterModel(tiny("llama", tie_word_embeddings=True))
    assert model.base.lm_head.weight is model.base.get_input_embeddings().weight
    model.add_adapter("head", LoraConfig(r=2, targets=("lm_head", "q_proj"), init="random"))
    emb = model.base.get_input_embeddings().weight.detach().clone()
    inputs = batch(2, 5)
    with torch.no_grad():
        want = model(**inputs, adapters="head").logits
        model.merge("head")
        torch.testing.assert_close(model(**inputs).logits, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.base.get_input_embeddings().weight, emb), "merge changed the tied embeddings"
        model.unmerge()
        with pytest.raises(ValueError, match="tied embeddings"):
            model.merge("head", keep_original=False)
        assert model.merged_adapter is None
        torch.testing.assert_close(model(**inputs, adapters="head").logits, want, atol=0, rtol=0)


def test_prefix_inference_cache_sees_in_place_edits():
    model = AdapterModel(tiny("llama")).eval()
    model.add_adapter("p", PrefixConfig(num_virtual_tokens=3))
    model.add_adapter("q", PrefixConfig(num_virtual_tokens=2))
    inputs = batch(2, 5)
    with torch.no_grad():
        first = model(**inputs, adapters=["p", "q"]).logits
        torch.testing.assert_close(model(**inputs, adapters=["p", "q"]).logits, first, atol=0, rtol=0)
        model.adapter_parameters("p")["prefix.embedding.weight"].mul_(2.0)
        edited = model(**inputs, adapters=["p", "q"]).logits
        assert (edited[0] - first[0]).abs().max() > 1e-4
        torch.testing.assert_close(edited[1], first[1], atol=1e-6, rtol=0)
