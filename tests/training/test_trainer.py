"""MultiTaskTrainer on a tiny BERT with the real MiniLM tokenizer and small synthetic tasks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import batch, shared_model, task_model, train_config, two_tasks

from adapters_mtl import AdapterModel
from adapters_mtl.training import MultiTaskTrainer, TrainConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return two_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.mark.parametrize(
    "batching,weighting", [("per_task", "static"), ("mixed", "uncertainty"), ("mixed", "dwa")]
)
def test_seeded_two_task_run_lowers_both_losses_and_touches_only_adapters(
    tmp_path, setup, batching, weighting
):
    tok, tasks, base = setup
    model = task_model(base, tasks)
    frozen = {k: v.clone() for k, v in model.base.state_dict().items() if ".lora_" not in k}
    trainer = MultiTaskTrainer(
        model, tok, tasks, train_config(tmp_path, batching=batching, weighting=weighting)
    )
    before = {t: trainer.evaluate(t) for t in tasks}
    result = trainer.train()
    hist = result["history"]
    for t in tasks:
        losses = [h[f"loss/{t}"] for h in hist if f"loss/{t}" in h]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"{t} loss did not go down: {losses}"
        assert trainer.evaluate(t)["accuracy"] > before[t]["accuracy"]
    for k, v in model.base.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, frozen[k]), k


def test_run_ends_cleanly_when_early_stopping_has_stopped_every_task(tmp_path, setup):
    # lr so small that no evaluation improves: with patience 1 both tasks stop at the second evaluation.
    # Before the fix the next step trained frozen adapters and raised "does not require grad".
    tok, tasks, base = setup
    model = task_model(base, tasks)
    trainer = MultiTaskTrainer(model, tok, tasks, train_config(tmp_path, lr=1e-12, eval_every=2, patience=1))
    result = trainer.train()
    assert result["step"] == 4 < 40
    assert all(b["stopped"] for b in result["best"].values())
    assert {t for h in result["history"] for t in tasks if f"loss/{t}" in h} == set(tasks)


def test_killed_and_resumed_run_ends_with_the_same_adapters(tmp_path, setup):
    tok, tasks, base = setup
    full = task_model(base, tasks)
    MultiTaskTrainer(full, tok, tasks, train_config(tmp_path / "a", steps=12, batching="mixed")).train()

    part = task_model(base, tasks)
    first = MultiTaskTrainer(
        part, tok, tasks, train_config(tmp_path / "b", steps=12, batching="mixed", checkpoint_every=6)
    )
    first.train(stop_after=7)  # "killed" after step 7; the last checkpoint is from step 6
    resumed_model = task_model(base, tasks)
    resumed = MultiTaskTrainer(
        resumed_model, tok, tasks, train_config(tmp_path / "b", steps=12, batching="mixed")
    )
    resumed.train(resume_from=tmp_path / "b" / "run" / "checkpoint")
    for t in tasks:
        want, got = full.adapter_parameters(t), resumed_model.adapter_parameters(t)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=f"{t}:{k}")


def test_bad_configs_are_refused(tmp_path, setup):
    tok, tasks, base = setup
    with pytest.raises(
        ValueError, match="batching must be 'per_task' or 'mixed'.*steps must be a positive int"
    ):
        TrainConfig(batching="both", steps=0)
    model = AdapterModel(copy.deepcopy(base))
    with pytest.raises(ValueError, match=r"tasks \[.topic., .mood.\] have no adapter in the model"):
        MultiTaskTrainer(model, tok, tasks, train_config(tmp_path))


def test_cli_train_runs_a_recipe_and_publishes(tmp_path, setup, capsys):
    import json

    import yaml

    from adapters_mtl.apps.cli import main
    from adapters_mtl.apps.recipe import RecipeError, load_recipe

    tok, tasks, base = setup
    folder = tmp_path / "base"
    base.save_pretrained(folder)
    tok.save_pretrained(folder)
    recipe = {
        "base": str(folder),
        "tasks": [{"name": t, "source": d.spec.source} for t, d in tasks.items()],
        "adapter": {"lora": {"r": 4, "targets": ["query", "value"]}},
        "train": {"steps": 50, "batch_size": 8, "eval_every": 2, "output_dir": str(tmp_path / "run")},
        "registry": str(tmp_path / "reg"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "train.steps=2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and set(summary["published"]) == {"topic", "mood"}
    assert (tmp_path / "run" / "metrics.csv").read_text().startswith("step,")
    assert (tmp_path / "run" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from adapters_mtl.registry import AdapterRegistry

    card = AdapterRegistry(tmp_path / "reg").show("topic")["card"]
    assert (
        card["metrics"]["accuracy"] == summary["test"]["topic"]["accuracy"]
        and card["recipe"]["train"]["steps"] == 2
    )
    with pytest.raises(RecipeError, match=r"train: unknown key\(s\) \['stepz'\]"):
        load_recipe(path, ["train.stepz=3"])
    with pytest.raises(RecipeError, match=r"tasks\[0\]: .*kind 'ner' is not supported"):
        load_recipe(path, ["tasks.0.kind=ner"])
    with pytest.raises(RecipeError, match=r"unknown top-level key\(s\) \['trian'\]"):
        load_recipe(path, ["trian.steps=1"])


@pytest.mark.parametrize("sharing,weighting", [("shared", "pcgrad"), ("adversarial", "gradnorm")])
def test_shared_adapter_training_lowers_losses_and_folds_each_task_into_one_adapter(
    tmp_path, setup, sharing, weighting
):
    tok, tasks, base = setup
    model = shared_model(base, tasks)
    cfg = train_config(
        tmp_path, batching="mixed", sharing=sharing, weighting=weighting, eval_every=100, steps=30
    )
    trainer = MultiTaskTrainer(model, tok, tasks, cfg)
    shared_before = {k: p.detach().clone() for k, p in model.adapter_parameters("shared").items()}
    disc = trainer.step_module.discriminator
    disc_before = [p.detach().clone() for p in disc.parameters()] if disc is not None else []
    trainer.train(stop_after=29)  # no evaluation yet: the adapters to fold are the current ones
    assert any(not torch.equal(p, shared_before[k]) for k, p in model.adapter_parameters("shared").items())
    if sharing == "adversarial":
        assert all(not torch.equal(a, b) for a, b in zip(disc.parameters(), disc_before, strict=True))
        assert all("loss/adversary" in h for h in trainer.history)
    for t in tasks:
        losses = [h[f"loss/{t}"] for h in trainer.history if f"loss/{t}" in h]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"{t} loss did not go down: {losses}"
    x = batch(3, 6)
    x["input_ids"] = x["input_ids"] % tok.vocab_size
    model.eval()
    with torch.no_grad():
        stacked = {t: model(**x, adapters=("shared", t)).heads[t].logits for t in tasks}
        trainer.restore_best()
        assert "shared" not in model.adapter_names and trainer.folded
        for t in tasks:  # one rank-(4+2) adapter per task computes what the stack did
            torch.testing.assert_close(model(**x, adapters=t).heads[t].logits, stacked[t], atol=1e-5, rtol=0)
            assert model.adapter_config(t)[0].r == 6


def test_sharing_and_weighting_errors(tmp_path, setup):
    tok, tasks, base = setup
    with pytest.raises(
        ValueError, match=r"sharing must be one of \['none', 'shared', 'adversarial', 'soft'\]"
    ):
        TrainConfig(sharing="yes")
    with pytest.raises(ValueError, match="needs a shared LoRA adapter named 'shared'"):
        MultiTaskTrainer(task_model(base, tasks), tok, tasks, train_config(tmp_path, sharing="shared"))
    with pytest.raises(
        ValueError,
        match="weighting 'pcgrad' works on per-task gradients of shared parameters and there are none",
    ):
        MultiTaskTrainer(
            task_model(base, tasks), tok, tasks, train_config(tmp_path, weighting="pcgrad", batching="mixed")
        )
    # gradient surgery / aggregation compares the tasks of one batch, outside fp16's loss scaling
    with pytest.raises(ValueError, match="batching: per_task gives each batch one task.*set batching: mixed"):
        TrainConfig(weighting="upgrad", batching="per_task")
    with pytest.raises(ValueError, match="outside fp16's loss scaling: use mixed_precision: bf16"):
        TrainConfig(weighting="pcgrad", batching="mixed", mixed_precision="fp16")
    with pytest.raises(ValueError, match="unfreeze='all' would train base weights it cannot shard"):
        TrainConfig(fsdp=True, unfreeze="all")


def test_adversarial_uncertainty_run_resumes_exactly_and_logs_to_tensorboard(tmp_path, setup):
    tok, tasks, base = setup
    kw = dict(steps=8, batching="mixed", sharing="adversarial", weighting="uncertainty", eval_every=4)
    full = shared_model(base, tasks)
    a = MultiTaskTrainer(full, tok, tasks, train_config(tmp_path / "a", log_with=["tensorboard"], **kw))
    a.train()
    assert list((tmp_path / "a" / "run").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    part = shared_model(base, tasks)
    MultiTaskTrainer(part, tok, tasks, train_config(tmp_path / "b", checkpoint_every=3, **kw)).train(
        stop_after=5
    )
    resumed = shared_model(base, tasks)
    b = MultiTaskTrainer(resumed, tok, tasks, train_config(tmp_path / "b", **kw))
    b.train(resume_from=tmp_path / "b" / "run" / "checkpoint")
    torch.testing.assert_close(b.weighting.log_vars, a.weighting.log_vars, atol=1e-6, rtol=0)
    for t in tasks:
        want, got = full.adapter_parameters(t), resumed.adapter_parameters(t)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=f"{t}:{k}")


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, setup):
    """Accelerate's bf16 autocast (CPU here; CUDA the same way) runs the routed step and lowers the loss;
    adapters stay fp32 (the optimiser's copy), the base untouched."""
    tok, tasks, base = setup
    model = task_model(base, tasks)
    trainer = MultiTaskTrainer(
        model, tok, tasks, train_config(tmp_path, steps=30, batching="mixed", mixed_precision="bf16")
    )
    trainer.train()
    assert all(p.dtype == torch.float32 for t in tasks for p in model.adapter_parameters(t).values())
    for t in tasks:
        losses = [h[f"loss/{t}"] for h in trainer.history if f"loss/{t}" in h]
        assert all(math.isfinite(v) for v in losses) and sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_mixed_precision_on_cuda(tmp_path, setup):
    tok, tasks, base = setup
    model = task_model(base, tasks).cuda()
    trainer = MultiTaskTrainer(
        model, tok, tasks, train_config(tmp_path, steps=30, batching="mixed", mixed_precision="fp16")
    )
    trainer.train()
    for t in tasks:
        losses = [h[f"loss/{t}"] for h in trainer.history if f"loss/{t}" in h]
        assert sum(losses[-5:]) < sum(losses[:5])
