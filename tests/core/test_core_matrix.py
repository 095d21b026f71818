"""The core test matrix: {LoRA, prefix, LoRA+prefix} × {BERT, Llama, GPT-2} tiny random models ×
{routed == alone, merge == unmerged, gradients only where routed, PEFT parity}."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LORA_TARGETS, PAD, batch, make_config, output, tiny

from adapters_mtl import AdapterModel
from adapters_mtl.files.folder import load_peft_state_dict

METHODS = ["lora", "prefix", "lora+prefix"]


def model_with(family: str, method: str, n: int = 2) -> AdapterModel:
    model = AdapterModel(tiny(family))
    torch.manual_seed(123)
    for i in range(n):
        model.add_adapter(f"{method.replace('+', '_')}{i}", make_config(method, family, i))
    return model


@pytest.mark.parametrize("method", METHODS)
def test_routed_equals_alone(family, method):
    model = model_with(family, method)
    model.add_adapter("other_lora", make_config("lora", family, 2))
    model.add_adapter("other_prefix", make_config("prefix", family, 2))
    a, b = model.adapter_names[:2]
    names = [a, None, b, "other_lora", a, "other_prefix"]
    inputs = batch(len(names), 9, pad=PAD[family])
    with torch.no_grad():
        mixed = output(model(**inputs, adapters=names), family)
        for i, name in enumerate(names):
            alone = output(model(**{k: v[i : i + 1] for k, v in inputs.items()}, adapters=name), family)[0]
            valid = inputs["attention_mask"][i].bool()
            torch.testing.assert_close(mixed[i][valid], alone[valid], atol=1e-5, rtol=0)
        # and a routed name differs from the bare base (the adapter really does something)
        base = output(model(**inputs, adapters=None), family)
        assert (mixed[0] - base[0]).abs().max() > 1e-4


@pytest.mark.parametrize("strategy", ["gather", "group", "segment"])
def test_lora_strategies_agree(family, strategy):
    model = model_with(family, "lora", n=3)
    model.routing_strategy = strategy
    names = ["lora0", "lora1", None, "lora2", "lora0"]
    inputs = batch(len(names), 6)
    with torch.no_grad():
        mixed = output(model(**inputs, adapters=names), family)
        for i, name in enumerate(names):
            alone = output(model(**{k: v[i : i + 1] for k, v in inputs.items()}, adapters=name), family)[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged(family, method):
    model = model_with(family, method)
    name = model.adapter_names[0]
    inputs = batch(3, 8)
    if method == "prefix":
        with pytest.raises(ValueError, match="no part that is a weight update"):
            model.merge(name)
        return
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    with torch.no_grad():
        unmerged = output(model(**inputs, adapters=name), family)
        model.merge(name)
        merged = output(model(**inputs), family)
        routed_merged = output(model(**inputs, adapters=name), family)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(routed_merged, unmerged, atol=1e-5, rtol=1e-5)
        snapshot = {k: v.clone() for k, v in model.base.state_dict().items()}
        model.merge(name)  # merging twice is a no-op
        for k, v in model.base.state_dict().items():
            assert torch.equal(v, snapshot[k]), k
        # W' = W + s·B·A for every targeted layer
        lora = model.method("lora")
        for path in lora.targets[name]:
            layer = lora.layers[path]
            expected = before[f"{path}.base_layer.weight"] + layer.delta_weight(name)
            torch.testing.assert_close(layer.base_layer.weight, expected, atol=1e-6, rtol=0)
        with pytest.raises(RuntimeError, match="merged"):
            model(**inputs, adapters=[name, None, name])
        model.unmerge()
        for k, v in model.base.state_dict().items():
            assert torch.equal(v, before[k]), f"unmerge did not restore {k} exactly"
        again = output(model(**inputs, adapters=name), family)
        torch.testing.assert_close(again, unmerged, atol=0, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_only_where_routed(family, method):
    model = model_with(family, method)
    used, unused = model.adapter_names[:2]
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    model.train()
    inputs = batch(4, 6)
    res = model(**inputs, adapters=[used, None, used, None])
    loss = output(res, family).pow(2).mean()
    if family == "bert":
        loss = loss + res.pooler_output.pow(2).mean()  # LoRA also targets the pooler's dense layer
    loss.backward()
    for key, p in model.adapter_parameters(used).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {used}:{key}"
    for key, p in model.adapter_parameters(unused).items():
        assert p.grad is None or p.grad.abs().sum() == 0, f"gradient leaked into unused {unused}:{key}"
    adapter_ids = {id(p) for n in model.adapter_names for p in model.adapter_parameters(n).values()}
    base_params = [p for p in model.base.parameters() if id(p) not in adapter_ids]
    assert base_params and all(p.grad is None and not p.requires_grad for p in base_params)
    unused_before = {k: p.detach().clone() for k, p in model.adapter_parameters(unused).items()}
    torch.optim.AdamW(model.trainable_parameters(), lr=1e-2).step()
    for k, v in model.base.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, base_before[k]), f"base weight {k} changed"
    for k, p in model.adapter_parameters(unused).items():
        assert torch.equal(p, unused_before[k]), f"unused adapter {unused}:{k} changed"
    # the stacked inference path sees the updated values (views share storage)
    model.eval()
    with torch.no_grad():
        names = [used, unused, None, used]
        mixed = output(model(**inputs, adapters=names), family)
        for i, name in enumerate(names):
            alone = output(model(**{k: v[i : i + 1] for k, v in inputs.items()}, adapters=name), family)[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)


def _peft_model(base, config, family):
    import peft

    task = "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"
    return peft.get_peft_model(base, config.to_peft(task_type=task) if hasattr(config, "to_peft") else config)


@pytest.mark.parametrize("method", METHODS)
def test_peft_parity(family, method):
    """Same weights → same outputs as PEFT's get_peft_model (the oracle for our layers)."""
    from peft import get_peft_model_state_dict

    torch.manual_seed(7)
    base = tiny(family)
    ours = AdapterModel(copy.deepcopy(base))
    inputs = batch(3, 8, pad=PAD[family])
    lora_cfg = make_config("lora", family, 1)  # rsLoRA + a rank_pattern
    prefix_cfg = make_config("prefix", family, 1 if method == "prefix" else 0)  # with / without projection
    peft_lora_cfg = lora_cfg.to_peft(
        target_modules=list(LORA_TARGETS[family]),
        init_lora_weights=False,
        task_type="FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM",
    )
    with torch.no_grad():
        if method in ("lora", "lora+prefix"):
            ref = _peft_model(copy.deepcopy(base), peft_lora_cfg, family).eval()
            ours.add_adapter("x", lora_cfg if method == "lora" else [lora_cfg, prefix_cfg])
            load_peft_state_dict_lora_only(ours, "x", get_peft_model_state_dict(ref))
            if method == "lora+prefix":
                # oracle: PEFT's LoRA folded into the weights, then PEFT's prefix tuning on top
                ref = _peft_model(ref.merge_and_unload(), prefix_cfg, family).eval()
                copy_prefix(ours, "x", ref)
        else:
            ref = _peft_model(copy.deepcopy(base), prefix_cfg, family).eval()
            ours.add_adapter("x", prefix_cfg)
            copy_prefix(ours, "x", ref)
        want = output(ref(**inputs), family)
        got = output(ours(**inputs, adapters="x"), family)
        mask = inputs["attention_mask"].bool()
        torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)


def load_peft_state_dict_lora_only(model, name, state):
    if "prefix" in model.method_names(name):
        prefix = model.method("prefix")
        # state has no prompt_embeddings (it is the LoRA model's); load LoRA keys, keep the prefix
        state = dict(state)
        state["prompt_embeddings"] = prefix.bank.prefixes[name].embedding.weight.clone()
        if prefix.bank.prefixes[name].transform is not None:
            raise AssertionError("use a non-projected prefix for this helper")
    load_peft_state_dict(model, name, state)


def copy_prefix(model, name, peft_model):
    encoder = peft_model.prompt_encoder["default"]
    mine = model.method("prefix").bank.prefixes[name]
    mine.load_state_dict(encoder.state_dict())
