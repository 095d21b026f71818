"""AdaLoRA through the method protocol, on BERT-, Llama- and GPT-2-like tiny models: the forward equals
PEFT's AdaLoraModel on the same weights, the rank schedule ends at PEFT's budget (and masks exactly what
PEFT masks, step for step), the folded LoRA equals the AdaLoRA, PEFT reads what we write and we read what
PEFT writes, save/load bit-exact, routed rows == each alone, gradients only where routed, and the trainer
drives the schedule."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import LORA_TARGETS, PAD, batch, output, tiny
from safetensors.torch import load_file

from adapters_mtl import AdapterModel, LoraConfig
from adapters_mtl.files.folder import load_adapter, save_adapter, save_folded
from adapters_mtl.methods import LoraMethod, method_for_peft_config, to_native
from adapters_mtl.methods.adalora import AdaLoraConfig, AdaLoraMethod

FAMILIES = ("bert", "llama", "gpt2")
TARGETS = {"bert": ("query", "value"), "llama": ("q_proj", "v_proj"), "gpt2": ("c_attn", "c_fc")}


def _config(family: str, **kw) -> AdaLoraConfig:
    base = dict(init_r=4, target_r=2, targets=TARGETS[family], tinit=1, tfinal=2, delta_t=2, total_step=8)
    return AdaLoraConfig(**{**base, **kw})


def _model(family: str) -> AdapterModel:
    model = AdapterModel(tiny(family))
    torch.manual_seed(5)
    model.add_adapter("a0", _config(family, init="random"))
    model.add_adapter("a1", _config(family, init="random", init_r=3, target_r=1))
    model.add_adapter("lora", LoraConfig(r=2, targets=LORA_TARGETS[family], init="random"))
    return model.eval()


def _run(model, x, family, adapters):
    with torch.no_grad():
        return output(model(**x, adapters=adapters), family)


def _method(model: AdapterModel) -> AdaLoraMethod:
    method = model.method("adalora")
    assert isinstance(method, AdaLoraMethod)
    return method


def _schedule(model: AdapterModel, name: str, family: str, steps: int = 8, seed: int = 2) -> list[int]:
    """``steps`` SGD steps of ``name`` on a squared-output loss plus the regulariser, each followed by the
    rank allocation; returns the total kept rank after each step."""
    model.train()
    method = _method(model)
    opt = torch.optim.SGD(model.adapter_parameters(name).values(), lr=0.05)
    kept = []
    for step in range(1, steps + 1):
        x = batch(4, 6, seed=seed + step, pad=PAD[family])
        loss = output(model(**x, adapters=name), family).float().pow(2).mean()
        reg = method.training_loss([name])
        assert reg is not None
        (loss + reg).backward()
        opt.step()
        method.after_step([name], step, steps)
        opt.zero_grad(set_to_none=True)
        kept.append(sum(method.kept_ranks(name).values()))
    return kept


def test_peft_adalora_config_goes_to_adalora_not_lora():
    cfg = peft.AdaLoraConfig(init_r=6, target_r=3, total_step=20, tinit=2, tfinal=4, deltaT=3, lora_alpha=16)
    assert method_for_peft_config(cfg) is AdaLoraMethod  # a LoraConfig subclass, matched by class name
    assert method_for_peft_config(peft.LoraConfig(r=4)) is LoraMethod
    (native,) = to_native(cfg)
    assert native == AdaLoraConfig(
        init_r=6, target_r=3, alpha=16, tinit=2, tfinal=4, delta_t=3, total_step=20
    )
    assert AdaLoraConfig.from_peft(native.to_peft()) == native
    with pytest.raises(ValueError) as e:
        AdaLoraConfig(init_r=4, target_r=5, beta1=1.0, tinit=5, tfinal=5, total_step=8)
    assert all(
        s in str(e.value) for s in ("target_r", "beta1", "no budgeting phase")
    )  # every problem at once
    with pytest.raises(ValueError, match="layers_to_transform"):
        AdaLoraConfig.from_peft(peft.AdaLoraConfig(total_step=5, layers_to_transform=[0]))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_peft_adalora_model_on_the_same_weights(family):
    model = _model(family)
    method = _method(model)
    x = batch(3, 6, pad=PAD[family])
    theirs = peft.get_peft_model(copy.deepcopy(tiny(family)), model.adapter_config("a0")[0].to_peft()).eval()
    copied = 0
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".lora_" in n:
                path, kind = n.removeprefix("base_model.model.").rsplit(".", 2)[:2]
                p.copy_(getattr(method.layers[path], kind)["a0"])
                copied += 1
        got, want = _run(model, x, family, "a0"), output(theirs(**x), family)
    assert copied == 3 * len(method.paths["a0"]) > 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    print(f"{family} PEFT parity max abs diff {(got - want).abs().max().item():.2e}")
    assert (got - _run(model, x, family, None)).abs().max() > 1e-3  # the adapter really acts


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_rows_equal_each_alone_with_lora_rows_bare_rows_and_stacks(family):
    model = _model(family)
    x = batch(6, 7, pad=PAD[family])
    rows = ["a0", None, "a1", ("lora", "a0"), "lora", "a0"]
    mixed = _run(model, x, family, rows)
    mask = x["attention_mask"].bool()
    for i, entry in enumerate(rows):
        alone = _run(model, x, family, entry)[i]
        torch.testing.assert_close(mixed[i][mask[i]], alone[mask[i]], atol=1e-5, rtol=0)
    bare = _run(model, x, family, None)
    assert (mixed[0] - bare[0]).abs().max() > 1e-3 and (
        mixed[2] - _run(model, x, family, "a0")[2]
    ).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_the_routed_adapter_and_the_base_stays(family):
    model = _model(family).train()
    x = batch(4, 6, pad=PAD[family])
    before = {k: v.clone() for k, v in model.base_parameters().items()}
    assert not any(".lora_" in k for k in before)  # our A/E/B are not taken for base parameters
    output(model(**x, adapters=["a0", None, "lora", "a0"]), family).float().pow(2).mean().backward()
    grads = {n: [p.grad for p in model.adapter_parameters(n).values()] for n in ("a0", "a1", "lora")}
    assert all(g is not None and g.abs().sum() > 0 for g in grads["a0"])
    assert all(g is None for g in grads["a1"])
    assert any(g is not None for g in grads["lora"])  # (LoRA on BERT's pooler gets none: not in the output)
    torch.optim.SGD(model.trainable_parameters(), lr=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in model.base_parameters().items())


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_the_schedule_ends_at_the_budget_peft_computes(family):
    model = _model(family)
    method = _method(model)
    init_bgt = sum(method.kept_ranks("a0").values())
    kept = _schedule(model, "a0", family)
    # PEFT's own allocator on PEFT's own model of this config: its final budget target_r x modules
    theirs = peft.get_peft_model(copy.deepcopy(tiny(family)), model.adapter_config("a0")[0].to_peft())
    target = theirs.base_model.rankallocator.target_bgt
    alloc = method.allocators["a0"]
    assert init_bgt == 4 * len(method.paths["a0"]) == alloc.init_bgt
    assert target == 2 * len(method.paths["a0"]) == alloc.target_bgt
    # steps 2 and 4 mask (delta_t 2, after tinit 1) to the cubic budget, step 6 = total - tfinal to the
    # target, and the last steps keep that mask
    expected = {step: alloc.budget_schedule(step)[0] for step in (2, 4)}
    assert [kept[1], kept[3]] == [expected[2], expected[4]] and init_bgt > expected[2] > expected[4] >= target
    assert kept[5:] == [target] * 3, kept
    assert all(r <= 4 for r in method.kept_ranks("a0").values())
    print(f"{family} budget: init {init_bgt}, after each step {kept}, PEFT target {target}")


def test_the_schedule_masks_what_peft_masks_step_for_step():
    family = "llama"
    model = AdapterModel(tiny(family))
    torch.manual_seed(5)
    model.add_adapter("a", _config(family, init="random", orth_reg_weight=0.3))
    method = _method(model)
    # (CAUSAL_LM: PEFT's model then calls AdaLoraModel.forward, which adds the regulariser to the loss)
    theirs = peft.get_peft_model(
        copy.deepcopy(tiny(family)), model.adapter_config("a")[0].to_peft(task_type="CAUSAL_LM")
    )
    pairs = []
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".lora_" in n:
                path, kind = n.removeprefix("base_model.model.").rsplit(".", 2)[:2]
                mine = getattr(method.layers[path], kind)["a"]
                p.copy_(mine)
                pairs.append((p, mine))
    ours_opt = torch.optim.SGD(model.adapter_parameters("a").values(), lr=0.05)
    their_opt = torch.optim.SGD([p for p, _ in pairs], lr=0.05)
    model.train()
    theirs.train()
    for step in range(1, 9):
        x = batch(3, 6, seed=step)
        ours_loss = model(**x, labels=x["input_ids"], adapters="a").loss + method.training_loss(["a"])
        their_loss = theirs(**x, labels=x["input_ids"]).loss  # PEFT adds its regulariser itself
        torch.testing.assert_close(ours_loss, their_loss, atol=1e-5, rtol=0)
        ours_loss.backward()
        their_loss.backward()
        ours_opt.step()
        their_opt.step()
        method.after_step(["a"], step, 8)
        theirs.base_model.update_and_allocate(step)
        ours_opt.zero_grad(set_to_none=True)
        their_opt.zero_grad(set_to_none=True)
        for theirs_p, mine in pairs:
            torch.testing.assert_close(mine, theirs_p, atol=1e-5, rtol=0)
            assert torch.equal(mine == 0, theirs_p == 0)  # the same triplets masked
    assert sum(method.kept_ranks("a").values()) == theirs.base_model.rankallocator.target_bgt


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_lora_equals_the_adalora_with_per_module_ranks(family, tmp_path):
    model = _model(family)
    method = _method(model)
    _schedule(model, "a0", family)
    model.eval()
    with torch.no_grad():  # one module keeps nothing: it is left out of the LoRA's targets
        dropped = method.paths["a0"][0]
        method.layers[dropped].lora_E["a0"].zero_()
    ranks = method.kept_ranks("a0")
    config, state = method.to_lora("a0")
    assert dropped not in config.targets and set(config.targets) == {p for p, k in ranks.items() if k > 0}
    assert {p: config.rank_pattern.get(p, config.r) for p in config.targets} == {
        p: ranks[p] for p in config.targets
    }
    model.attach_folded("a0", "folded")
    x = batch(4, 6, pad=PAD[family])
    want = _run(model, x, family, "a0")
    got = _run(model, x, family, "folded")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    print(f"{family} folded LoRA vs AdaLoRA max abs diff {(got - want).abs().max().item():.2e}")
    # saved as a plain LoRA folder: PEFT reads it as a LoraConfig with PEFT's rank/alpha patterns
    folder = save_folded(model, "a0", tmp_path / "lora")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny(family)), str(folder)).eval()
    assert type(theirs.peft_config["default"]).__name__ == "LoraConfig"
    with torch.no_grad():
        torch.testing.assert_close(output(theirs(**x), family), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_reads_ours_and_we_read_peft(family, tmp_path):
    model = _model(family)
    _schedule(model, "a0", family)
    model.eval()
    x = batch(3, 6, pad=PAD[family])
    folder = save_adapter(model, "a0", tmp_path / "a0")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny(family)), str(folder)).eval()
    saved = theirs.peft_config["default"]
    assert sum(sum(m) for m in saved.rank_pattern.values()) == sum(_method(model).kept_ranks("a0").values())
    with torch.no_grad():
        want = _run(model, x, family, "a0")
        torch.testing.assert_close(output(theirs(**x), family), want, atol=1e-5, rtol=0)
    # the other way: PEFT's AdaLoRA with a rank_pattern (one module keeps nothing) loads with PEFT's outputs
    torch.manual_seed(9)
    cfg = peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=5, target_modules=list(TARGETS[family]), init_lora_weights=False
    )
    made = peft.get_peft_model(copy.deepcopy(tiny(family)), cfg).eval()
    pattern = {}
    with torch.no_grad():
        for n, p in made.base_model.model.named_parameters():
            if ".lora_E." in n:
                keep = torch.tensor(
                    [False] * 4 if not pattern else [j % 2 == len(pattern) % 2 or j == 3 for j in range(4)]
                )
                p[~keep] = 0
                pattern[n] = keep.tolist()
    made.peft_config["default"].rank_pattern = pattern
    made.save_pretrained(str(tmp_path / "peft"))
    ours = AdapterModel(tiny(family)).eval()
    assert load_adapter(ours, tmp_path / "peft", name="p") == "p"
    with torch.no_grad():
        torch.testing.assert_close(_run(ours, x, family, "p"), output(made(**x), family), atol=1e-5, rtol=0)
    assert min(_method(ours).kept_ranks("p").values()) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_bit_exact(family, tmp_path):
    model = _model(family)
    _schedule(model, "a0", family)
    model.eval()
    x = batch(3, 6, pad=PAD[family])
    for name in ("a0", "a1"):  # with ranks allocated (kept triplets saved) and without (all saved)
        folder = save_adapter(model, name, tmp_path / name)
        fresh = AdapterModel(tiny(family)).eval()
        load_adapter(fresh, folder)
        torch.testing.assert_close(_run(fresh, x, family, name), _run(model, x, family, name), atol=0, rtol=0)
        again = save_adapter(fresh, name, tmp_path / f"{name}-again")
        first, second = (load_file(f / "adapter_model.safetensors") for f in (folder, again))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    want, got = model.adapter_parameters("a1"), fresh.adapter_parameters("a1")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_unmerged_and_unmerge_is_bit_exact(family):
    model = _model(family)
    x = batch(3, 6, pad=PAD[family])
    before = {k: v.clone() for k, v in model.base_parameters().items()}
    unmerged = _run(model, x, family, "a0")
    model.merge("a0")
    torch.testing.assert_close(output(model(**x), family).detach(), unmerged, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="merged"):
        model(**x, adapters=["a0", "a1", None])
    model.unmerge()
    assert all(torch.equal(before[k], v) for k, v in model.base_parameters().items())


def test_the_trainer_drives_the_schedule_and_lowers_the_loss(tmp_path):
    from helpers import train_config, two_tasks

    from adapters_mtl.training import MultiTaskTrainer

    tok, tasks, base = two_tasks(tmp_path)
    model = AdapterModel(copy.deepcopy(base))
    torch.manual_seed(0)
    for name, data in tasks.items():  # total_step: None = the run's 40 steps
        cfg = AdaLoraConfig(init_r=4, target_r=2, targets=("query", "value"), tinit=5, tfinal=10, delta_t=5)
        model.add_adapter(name, cfg, head=data.head_config())
    frozen = {k: v.clone() for k, v in model.base_parameters().items()}
    # one evaluation, at the end: the adapters kept are the last step's (early stopping restores its best)
    # (one task per batch: an adapter without rows in a step keeps its scores and is masked on schedule;
    # E starts at zero and A, B near it, as PEFT's: the update needs a large step to matter)
    config = train_config(tmp_path, eval_every=40, lr=0.3)
    result = MultiTaskTrainer(model, tok, tasks, config).train()
    method = _method(model)
    for t in tasks:
        losses = [h[f"loss/{t}"] for h in result["history"] if f"loss/{t}" in h]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"{t}: {losses}"
        assert method.allocators[t].peft_config.total_step == 40
        assert sum(method.kept_ranks(t).values()) == method.allocators[t].target_bgt == 2 * 4
    reg = [h["loss/regulariser"] for h in result["history"]]
    assert len(reg) == 40 and reg[-1] < reg[0]  # the orthogonality regulariser is trained too
    assert all(torch.equal(frozen[k], v) for k, v in model.base_parameters().items())


def test_early_stopping_keeps_no_adapter_from_before_the_final_allocation(tmp_path):
    from helpers import train_config, two_tasks

    from adapters_mtl.training import MultiTaskTrainer

    tok, tasks, base = two_tasks(tmp_path)
    model = AdapterModel(copy.deepcopy(base))
    torch.manual_seed(0)
    for name, data in tasks.items():
        cfg = AdaLoraConfig(init_r=4, target_r=2, targets=("query", "value"), tinit=2, tfinal=6, delta_t=2)
        model.add_adapter(name, cfg, head=data.head_config())
    # evaluations every 2 steps with patience 1 would stop (and restore) long before step 20 - 6 = 14
    trainer = MultiTaskTrainer(model, tok, tasks, train_config(tmp_path, steps=20, eval_every=2, patience=1))
    result = trainer.train()
    method = model.method("adalora")
    for t in tasks:
        assert result["best"][t]["step"] >= 14, result["best"][t]
        assert sum(method.kept_ranks(t).values()) == 2 * len(method.paths[t])  # the final budget
