"""(IA)³ through the method protocol, on BERT-, Llama- and GPT-2-like tiny models: routed rows == each
alone (stacks with LoRA included), PEFT reads what we write and we read what PEFT writes (same outputs),
save/load bit-exact, merge == unmerged and unmerge bit-exact, gradients only where routed."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import LORA_TARGETS, PAD, batch, output, tiny

from adapters_mtl import AdapterModel, IA3Config, LoraConfig
from adapters_mtl.files.folder import load_adapter, save_adapter

FAMILIES = ("bert", "llama", "gpt2")


def _model(family: str) -> AdapterModel:
    model = AdapterModel(tiny(family))
    torch.manual_seed(5)
    model.add_adapter("i0", IA3Config(init="random"))  # PEFT's default targets (and feed-forward) per type
    model.add_adapter("i1", IA3Config(init="random"))
    model.add_adapter("lora", LoraConfig(r=2, targets=LORA_TARGETS[family], init="random"))
    return model.eval()


def _run(model, x, family, adapters):
    with torch.no_grad():
        return output(model(**x, adapters=adapters), family)


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_rows_equal_each_alone_with_stacks(family):
    model = _model(family)
    x = batch(5, 7, pad=PAD[family])
    rows = ["i0", None, "i1", ("lora", "i0"), "lora"]
    mixed = _run(model, x, family, rows)
    mask = x["attention_mask"].bool()
    for i, entry in enumerate(rows):
        alone = _run(model, x, family, entry)[i]
        torch.testing.assert_close(mixed[i][mask[i]], alone[mask[i]], atol=1e-5, rtol=0)
    assert (mixed[0] - _run(model, x, family, None)[0]).abs().max() > 1e-3  # the vectors really act


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_reads_ours_and_we_read_peft(family, tmp_path):
    model = _model(family)
    x = batch(3, 6, pad=PAD[family])
    folder = save_adapter(model, "i0", tmp_path / "i0")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny(family)), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            output(theirs(**x), family), _run(model, x, family, "i0"), atol=1e-5, rtol=0
        )
    # the other way: an adapter PEFT made (its defaults, random vectors) loads and gives PEFT's outputs
    torch.manual_seed(9)
    made = peft.get_peft_model(copy.deepcopy(tiny(family)), peft.IA3Config(init_ia3_weights=False)).eval()
    made.save_pretrained(str(tmp_path / "peft"))
    ours = AdapterModel(tiny(family)).eval()
    assert load_adapter(ours, tmp_path / "peft", name="p") == "p"
    with torch.no_grad():
        torch.testing.assert_close(_run(ours, x, family, "p"), output(made(**x), family), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_bit_exact(family, tmp_path):
    model = _model(family)
    x = batch(3, 6, pad=PAD[family])
    folder = save_adapter(model, "i1", tmp_path / "i1")
    fresh = AdapterModel(tiny(family)).eval()
    load_adapter(fresh, folder)
    want, got = model.adapter_parameters("i1"), fresh.adapter_parameters("i1")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    torch.testing.assert_close(_run(fresh, x, family, "i1"), _run(model, x, family, "i1"), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_unmerged_and_unmerge_is_bit_exact(family):
    model = _model(family)
    x = batch(3, 6, pad=PAD[family])
    before = {k: v.clone() for k, v in model.base_parameters().items()}
    unmerged = _run(model, x, family, "i0")
    model.merge("i0")
    assert model.merged_adapter == "i0"
    torch.testing.assert_close(output(model(**x), family).detach(), unmerged, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        model(**x, adapters=["i0", "i1", None])
    model.unmerge()
    after = model.base_parameters()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.has_factors("i0")  # a scaling is not a low-rank update: merge_adapters refuses it


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_the_routed_adapter_and_the_base_stays(family):
    model = _model(family).train()
    x = batch(4, 6, pad=PAD[family])
    before = {k: v.clone() for k, v in model.base_parameters().items()}
    out = output(model(**x, adapters=["i0", None, "i0", None]), family)
    out.float().pow(2).mean().backward()
    grads = {n: p.grad for n in ("i0", "i1", "lora") for p in model.adapter_parameters(n).values()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter_parameters("i0").values())
    assert all(p.grad is None for n in ("i1", "lora") for p in model.adapter_parameters(n).values()), (
        grads.keys()
    )
    torch.optim.SGD(model.trainable_parameters(), lr=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in model.base_parameters().items())


def test_a_seeded_two_task_run_with_ia3_adapters_lowers_both_losses(tmp_path):
    from helpers import train_config, two_tasks

    from adapters_mtl.training import MultiTaskTrainer

    tok, tasks, base = two_tasks(tmp_path)
    model = AdapterModel(copy.deepcopy(base))
    torch.manual_seed(0)
    for name, data in tasks.items():
        model.add_adapter(name, IA3Config(), head=data.head_config())
    frozen = {k: v.clone() for k, v in model.base_parameters().items()}
    # a tiny random base pools nearly the same vector for every text: scalings need a large step to matter
    result = MultiTaskTrainer(model, tok, tasks, train_config(tmp_path, steps=80, lr=0.3)).train()
    for t in tasks:
        losses = [h[f"loss/{t}"] for h in result["history"] if f"loss/{t}" in h]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"{t}: {losses}"
        vectors = model.adapter_parameters(t)
        assert any((p - 1).abs().max() > 1e-4 for k, p in vectors.items() if k.endswith("ia3_l"))  # trained
    assert all(torch.equal(frozen[k], v) for k, v in model.base_parameters().items())
