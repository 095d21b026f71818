"""RoutedTrainer: two adapters trained under transformers.Trainer on mixed batches (tiny BERT, MiniLM tokenizer)."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from helpers import task_model, two_tasks
from safetensors import safe_open
from torch.nn import functional as F
from transformers import TrainerCallback, TrainingArguments
from typing_extensions import override

from adapters_mtl.data.tasks import TaskData, TaskSpec
from adapters_mtl.training.hf_trainer import RoutedCollator, RoutedTrainer, routed_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok, tasks, base = two_tasks(tmp_path_factory.mktemp("tasks"))
    return tok, tasks, base, routed_dataset(tasks, tok, "train"), routed_dataset(tasks, tok, "validation")


def hf_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=40,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **kw})


class LogSpy(TrainerCallback):
    def __init__(self) -> None:
        self.logs = []

    @override
    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_two_adapters_train_under_transformers_trainer_with_user_callbacks(tmp_path, setup):
    tok, tasks, base, train, val = setup
    model = task_model(base, tasks)
    frozen = {k: p.detach().clone() for k, p in model.base_parameters().items()}
    before = {t: {k: p.detach().clone() for k, p in model.adapter_parameters(t).items()} for t in tasks}
    spy = LogSpy()
    trainer = RoutedTrainer(
        model,
        tasks,
        hf_args(tmp_path),
        train_dataset=train,
        eval_dataset=val,
        processing_class=tok,
        callbacks=[spy],
    )
    trainer.train()

    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in model.trainable_parameters()}  # adapters and heads only
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"loss did not go down: {losses}"
    for t in tasks:  # both tasks' losses are logged (mixed batches) and go down; both adapters moved
        mine = [h[f"loss_{t}"] for h in trainer.state.log_history if f"loss_{t}" in h]
        assert sum(mine[-5:]) / 5 < sum(mine[:5]) / 5 - 0.2, f"{t} loss did not go down: {mine}"
        for k, p in model.adapter_parameters(t).items():
            assert not torch.equal(p.detach(), before[t][k]), f"{t}: {k} did not change"
    for k, p in model.base_parameters().items():
        assert torch.equal(p, frozen[k]), k
    assert len([h for h in spy.logs if "loss" in h]) == 40  # the user's callback saw every log

    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and 0 < metrics["eval_loss"] < losses[0]
    assert spy.logs[-1]["eval_loss"] == metrics["eval_loss"]


def test_mixed_batch_loss_equals_each_rows_loss_alone(tmp_path, setup):
    tok, tasks, base, train, _ = setup
    model = task_model(base, tasks).eval()  # no head dropout: rows alone compute the same
    n_topic = len(tasks["topic"].encode(tok, "train"))
    features = [train[i] for i in (0, n_topic, 1, n_topic + 1, n_topic + 2, 2, 3)]
    assert [f["task"] for f in features] == ["topic", "mood", "topic", "mood", "mood", "topic", "topic"]
    collator = RoutedCollator(tok)
    batch = collator(features)
    assert batch["adapters"] == batch["tasks"] == [f["task"] for f in features]
    trainer = RoutedTrainer(model, tasks, hf_args(tmp_path), processing_class=tok)
    with torch.no_grad():
        loss, out = trainer.compute_loss(model, batch, return_outputs=True)
        alone = []
        for f in features:  # each row on its own, its loss by hand
            one = collator([f])
            logits = model(**{k: v for k, v in one.items() if k not in ("tasks", "labels")}).heads[f["task"]]
            alone.append(F.cross_entropy(logits.logits, torch.tensor([f["labels"]])))
    assert set(out.heads) == set(tasks)
    rows = torch.stack(alone)
    assert abs(loss.item() - rows.mean().item()) < 1e-6  # the mean of the rows' losses
    for t in tasks:  # and each task's loss is its rows' mean
        mine = [i for i, f in enumerate(features) if f["task"] == t]
        logits = out.heads[t].logits
        y = torch.tensor([features[i]["labels"] for i in mine])
        assert abs(F.cross_entropy(logits, y).item() - rows[mine].mean().item()) < 1e-6


def test_checkpoints_hold_only_adapters_and_heads_and_resume_exactly(tmp_path, setup):
    tok, tasks, base, train, _ = setup
    kw = dict(max_steps=4, logging_steps=2)
    full = task_model(base, tasks)
    RoutedTrainer(
        full, tasks, hf_args(tmp_path / "a", **kw), train_dataset=train, processing_class=tok
    ).train()

    part = task_model(base, tasks)
    args = hf_args(tmp_path / "b", save_strategy="steps", save_steps=2, **kw)
    RoutedTrainer(part, tasks, args, train_dataset=train, processing_class=tok).train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-2"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {n for n, p in part.named_parameters() if p.requires_grad}

    resumed = task_model(base, tasks)
    args = hf_args(tmp_path / "c", save_steps=2, **kw)  # the arguments the checkpoint was made with
    RoutedTrainer(resumed, tasks, args, train_dataset=train, processing_class=tok).train(
        resume_from_checkpoint=str(ckpt)
    )
    for t in tasks:
        want, got = full.adapter_parameters(t), resumed.adapter_parameters(t)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=f"{t}:{k}")


def in_memory_task(name: str, kind: str, texts: list, labels: list, label_names=None) -> TaskData:
    spec = TaskSpec(name=name, source="in-memory.csv", kind=kind, label_names=label_names)
    split = datasets.Dataset.from_dict({"text": texts, "label": labels})
    return TaskData(spec, {"train": split}, spec.label_names, {"train": list(range(len(texts)))})


def test_tasks_of_other_kinds_share_a_dataset_and_a_batch(tmp_path, setup):
    tok, tasks, base, _, _ = setup
    score = in_memory_task(
        "score", "regression", ["alpha beta", "river stone cloud", "green"], [0.5, -1.0, 2.0]
    )
    tags = in_memory_task(
        "tags", "token_cls", [["alpha", "river"], ["quick", "slow", "dark"]], [[0, 1], [1, 1, 0]], ("O", "X")
    )
    topic = tasks["topic"]
    mixed = routed_dataset({"topic": topic, "score": score}, tok)
    assert isinstance(mixed, datasets.Dataset)  # int and float labels share a float column
    both = routed_dataset({"topic": topic, "tags": tags}, tok)
    assert isinstance(both, torch.utils.data.ConcatDataset)  # per-token next to per-text labels
    every = {"topic": topic, "score": score, "tags": tags}
    model = task_model(base, every).eval()
    trainer = RoutedTrainer(model, every, hf_args(tmp_path), processing_class=tok)
    n = len(topic.encode(tok, "train"))
    features = [mixed[0], mixed[n], both[1], both[n + 1], mixed[n + 2]]
    batch = RoutedCollator(tok)(features)
    assert batch["tasks"] == batch["adapters"] == ["topic", "score", "topic", "tags", "score"]
    assert RoutedCollator(tok, routes={"topic": ("shared", "topic")})(features[:2])["adapters"] == [
        ("shared", "topic"),
        "score",
    ]
    with torch.no_grad():
        loss, out = trainer.compute_loss(model, batch, return_outputs=True)
    topic_y = torch.tensor([int(mixed[0]["labels"]), both[1]["labels"]])
    tags_logits = out.heads["tags"].logits[0]  # (T, 2): the one tags row
    tags_y = torch.full(tags_logits.shape[:1], -100)
    tags_y[: len(batch["labels"][3])] = torch.tensor(batch["labels"][3])
    want = (  # each task's mean loss weighted by its rows: 2 topic, 2 score, 1 tags of 5
        2 * F.cross_entropy(out.heads["topic"].logits, topic_y)
        + 2 * F.mse_loss(out.heads["score"].logits.squeeze(-1), torch.tensor([0.5, 2.0]))
        + F.cross_entropy(tags_logits, tags_y, ignore_index=-100)
    ) / 5
    assert abs(loss.item() - want.item()) < 1e-6
