"""Training as Hugging Face users set it up: learning-rate schedules with warm-up (transformers'
get_scheduler), epochs instead of steps, per-task learning rates, and weight decay on matrices only."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import task_model, train_config, two_tasks
from transformers import get_scheduler

from adapters_mtl import AdapterModel, IA3Config, LoraConfig
from adapters_mtl.training import MultiTaskTrainer, TrainConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return two_tasks(tmp_path_factory.mktemp("tasks"))


def _lrs(trainer: MultiTaskTrainer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        trainer.train(stop_after=1)
        out.append(trainer.optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize(
    ("scheduler", "warmup"), [("cosine", {"warmup_ratio": 0.25}), ("linear", {"warmup_steps": 2})]
)
def test_the_schedule_is_transformers_own_after_warm_up(tmp_path, setup, scheduler, warmup):
    tok, tasks, base = setup
    cfg = train_config(tmp_path, steps=8, eval_every=100, scheduler=scheduler, **warmup)
    trainer = MultiTaskTrainer(task_model(base, tasks), tok, tasks, cfg)
    got = _lrs(trainer, 8)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    ref = get_scheduler(scheduler, ref_opt, num_warmup_steps=2, num_training_steps=8)
    want = []
    for _ in range(8):
        ref_opt.step()
        ref.step()
        want.append(ref_opt.param_groups[0]["lr"])
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] < got[1] and got[-1] < max(got)  # it warms up, then decays


def test_a_resumed_run_continues_the_schedule(tmp_path, setup):
    tok, tasks, base = setup
    kw = dict(steps=10, batching="mixed", scheduler="cosine", warmup_steps=3, eval_every=100)
    full = task_model(base, tasks)
    MultiTaskTrainer(full, tok, tasks, train_config(tmp_path / "a", **kw)).train()
    first = MultiTaskTrainer(
        task_model(base, tasks), tok, tasks, train_config(tmp_path / "b", checkpoint_every=4, **kw)
    )
    first.train(stop_after=5)  # killed after step 5; the checkpoint is from step 4
    resumed_model = task_model(base, tasks)
    resumed = MultiTaskTrainer(resumed_model, tok, tasks, train_config(tmp_path / "b", **kw))
    resumed.train(resume_from=tmp_path / "b" / "run" / "checkpoint")
    for t in tasks:
        want, got = full.adapter_parameters(t), resumed_model.adapter_parameters(t)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=f"{t}:{k}")


def test_epochs_become_steps_from_the_training_rows(tmp_path, setup):
    tok, tasks, base = setup
    cfg = train_config(tmp_path, steps=None, epochs=0.5, batch_size=8, eval_every=100)
    trainer = MultiTaskTrainer(task_model(base, tasks), tok, tasks, cfg)
    rows = sum(len(d.splits["train"]) for d in tasks.values())
    assert trainer.cfg.steps == math.ceil(0.5 * rows / 8)
    assert trainer.train()["step"] == trainer.cfg.steps


def test_per_task_learning_rates_and_no_decay_on_vectors(tmp_path, setup):
    tok, tasks, base = setup
    first, second = list(tasks)
    model = AdapterModel(copy.deepcopy(base))
    torch.manual_seed(0)
    model.add_adapter(first, LoraConfig(r=2, targets=("value",)), head=tasks[first].head_config())
    model.add_adapter(second, IA3Config(), head=tasks[second].head_config())
    cfg = train_config(tmp_path, steps=4, weight_decay=0.1, task_lr={first: 1e-3}, eval_every=100)
    trainer = MultiTaskTrainer(model, tok, tasks, cfg)
    by_param = {
        id(p): (g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups for p in g["params"]
    }
    for t, lr in ((first, 1e-3), (second, cfg.lr)):
        for k, p in model.adapter_parameters(t).items():
            decays = p.dim() >= 2
            assert by_param[id(p)] == (lr, 0.1 if decays else 0.0), (t, k)
    assert any(p.dim() == 1 for p in model.adapter_parameters(second).values())  # IA3 vectors never decay
    with pytest.raises(ValueError, match=r"task_lr names \['nope'\]"):
        MultiTaskTrainer(model, tok, tasks, train_config(tmp_path, task_lr={"nope": 1e-3}))


def test_schedule_settings_are_checked_together():
    with pytest.raises(ValueError) as e:
        TrainConfig(steps=10, epochs=2, scheduler="exp", warmup_steps=2, warmup_ratio=0.1)
    for part in ("steps or epochs, not both", "scheduler must be one of", "warmup_steps or warmup_ratio"):
        assert part in str(e.value)
    assert TrainConfig().steps == 100 and TrainConfig(epochs=1.5).steps is None


def test_the_trainer_refuses_a_task_with_an_empty_split(tmp_path, setup):
    import dataclasses

    tok, tasks, base = setup
    first = next(iter(tasks))
    emptied = {**tasks, first: dataclasses.replace(tasks[first], splits={**tasks[first].splits})}
    emptied[first].splits["validation"] = emptied[first].splits["validation"].select([])
    with pytest.raises(ValueError, match="have an empty split"):
        MultiTaskTrainer(task_model(base, tasks), tok, emptied, train_config(tmp_path))
