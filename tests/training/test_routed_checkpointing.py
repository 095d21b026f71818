"""Activation checkpointing with per-row routing: AdapterModel.activation_checkpointing_enable() makes every
recomputed layer see the routing (and prefix keys/values) of its forward, so the gradients of a mixed
batch equal those without checkpointing, for every method and stacks; enabled on the base directly, routed
calls are still refused rather than wrong."""

from __future__ import annotations

import pytest
import torch
from helpers import PAD, batch, output, tiny

from adapters_mtl import AdapterModel, BottleneckConfig, IA3Config, LoraConfig, PrefixConfig
from adapters_mtl.training import MultiTaskTrainer

ROWS = ["lora", "pre", ("lora", "bn"), "ia3", None, ("dora", "pre")]


def _model(family: str) -> AdapterModel:
    model = AdapterModel(tiny(family))
    torch.manual_seed(3)
    targets = {"bert": ("query", "value"), "llama": ("q_proj", "v_proj")}[family]
    model.add_adapter("lora", LoraConfig(r=2, targets=targets, init="random"))
    model.add_adapter("dora", LoraConfig(r=2, targets=targets, init="random", use_dora=True))
    model.add_adapter("pre", PrefixConfig(num_virtual_tokens=2))
    model.add_adapter("ia3", IA3Config(init="random"))
    model.add_adapter("bn", BottleneckConfig(init="random", size=4))
    with torch.no_grad():
        for p in model.adapter_parameters("pre").values():
            p.normal_(0, 0.5)
    return model.train()


def _grads(model: AdapterModel, family: str) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = batch(len(ROWS), 6, pad=PAD[family])
    out = output(model(**x, adapters=ROWS), family)
    out.float().pow(2).mean().backward()
    return {
        f"{n}:{k}": p.grad.clone()
        for n in model.adapter_names
        for k, p in model.adapter_parameters(n).items()
        if p.grad is not None
    }


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_checkpointed_gradients_equal_plain_ones_for_a_mixed_batch_of_every_method(family):
    model = _model(family)
    want = _grads(model, family)
    model.activation_checkpointing_enable()
    assert model.base.is_activation_checkpointing
    got = _grads(model, family)
    assert want.keys() == got.keys() and len(want) > 10
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_enabled_on_the_base_routed_calls_are_refused_and_options_are_checked():
    model = _model("bert")
    model.base.activation_checkpointing_enable()
    with pytest.raises(NotImplementedError, match=r"model.activation_checkpointing_enable\(\)"):
        _grads(model, "bert")
    with pytest.raises(ValueError, match="use_reentrant"):
        model.activation_checkpointing_enable(use_reentrant=True)
    model.activation_checkpointing_enable()  # replaces the base's checkpoint function: now routed
    assert _grads(model, "bert")


def test_the_trainer_trains_with_checkpointing_and_gets_the_same_adapters(tmp_path):
    from helpers import task_model, train_config, two_tasks

    tok, tasks, base = two_tasks(tmp_path)
    results = []
    for on in (False, True):
        model = task_model(base, tasks)
        cfg = train_config(tmp_path / str(on), steps=6, batching="mixed", activation_checkpointing=on)
        MultiTaskTrainer(model, tok, tasks, cfg).train()
        assert model.base.is_activation_checkpointing == on
        results.append(
            {f"{t}:{k}": p.detach().clone() for t in tasks for k, p in model.adapter_parameters(t).items()}
        )
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], atol=1e-5, rtol=1e-4, msg=k)
