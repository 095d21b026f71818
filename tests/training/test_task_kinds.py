"""Token classification and causal-LM tasks (classification as generation, free generation) through the
same trainer: losses go down, the metrics of each kind are computed the way their definitions say."""

from __future__ import annotations

import copy
import functools
import random
from pathlib import Path

import pytest
import torch
from helpers import LORA_TARGETS, TOPIC, WORDS, minilm_tokenizer, task_csv, tiny, train_config

from adapters_mtl import AdapterModel, LoraConfig
from adapters_mtl.data.tasks import TaskSpec, load_task
from adapters_mtl.training import MultiTaskTrainer


@pytest.fixture(scope="module")
def tok():
    t = minilm_tokenizer()
    t.eos_token = "[SEP]"  # a BERT vocabulary used as a causal LM's: [SEP] ends a target
    return t


_cfg = functools.partial(train_config, eval_every=40)  # one evaluation, at the end


def _train(model, tok, tasks, cfg):
    trainer = MultiTaskTrainer(model, tok, tasks, cfg)
    before = {t: trainer.evaluate(t) for t in tasks}
    trainer.train()
    return trainer, before


def test_token_classification_learns_per_word_tags(tmp_path, tok):
    rnd = random.Random(0)
    lines = ["text,label"]
    for _ in range(160):
        words = [rnd.choice(WORDS) for _ in range(6)]
        lines.append(f"{' '.join(words)},{' '.join('B' if w in ('river', 'stone') else 'O' for w in words)}")
    (tmp_path / "ner.csv").write_text("\n".join(lines))
    data = load_task(TaskSpec(name="ner", source=str(tmp_path / "ner.csv"), kind="token_cls"))
    assert data.label_names == ("B", "O")
    enc = data.encode(tok, "train")[0]
    assert enc["labels"][0] == -100 and enc["labels"][-1] == -100  # [CLS] and [SEP] carry no tag
    assert sum(v != -100 for v in enc["labels"]) == 6  # one tag per word (first sub-word only)
    model = AdapterModel(tiny("bert", vocab_size=tok.vocab_size, max_position_embeddings=64))
    torch.manual_seed(0)
    model.add_adapter("ner", LoraConfig(r=4, targets=("query", "value")), head=data.head_config())
    trainer, before = _train(model, tok, {"ner": data}, _cfg(tmp_path))
    losses = [h["loss/ner"] for h in trainer.history]
    assert sum(losses[-5:]) < sum(losses[:5])
    after = trainer.evaluate("ner", "test")
    assert after["accuracy"] > max(before["ner"]["accuracy"], 0.9), (before, after)


def _topic_csv(path: Path) -> str:
    return task_csv(path, 200, *TOPIC, 1, filler=4)


def test_classification_as_generation_ranks_label_names(tmp_path, tok):
    spec = TaskSpec(
        name="topic",
        source=_topic_csv(tmp_path / "t.csv"),
        kind="causal_lm",
        label_names=("sport", "politics"),
        extra={"prompt": "{text} topic:"},
        max_length=16,
    )
    data = load_task(spec)
    ids, labels = data.causal_ids(tok, "a b c d e f g h i j k l m n o p q", data.target(0))
    assert len(ids) == 16 and tok.decode(ids).endswith(
        "topic : sport [SEP]"
    )  # the text is cut, not the prompt
    assert [t for t in labels if t != -100] == tok(" sport", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    base = tiny("llama", vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id)
    model = AdapterModel(copy.deepcopy(base))
    torch.manual_seed(0)
    model.add_adapter("topic", LoraConfig(r=4, targets=LORA_TARGETS["llama"]))
    trainer, before = _train(model, tok, {"topic": data}, _cfg(tmp_path, steps=60, lr=2e-2))
    after = trainer.evaluate("topic", "test")
    assert after["accuracy"] >= 0.9 and after["accuracy"] > before["topic"]["accuracy"], (before, after)
    gen = trainer.evaluate("topic", "test")
    assert gen == after


def test_free_generation_lowers_target_perplexity(tmp_path, tok):
    rnd = random.Random(2)
    rows = ["text,label"] + [
        f"{w} {v},{w}" for w, v in ((rnd.choice(WORDS), rnd.choice(WORDS)) for _ in range(160))
    ]
    (tmp_path / "g.csv").write_text("\n".join(rows))
    data = load_task(
        TaskSpec(
            name="echo",
            source=str(tmp_path / "g.csv"),
            kind="causal_lm",
            extra={"prompt": "repeat the first word: {text} ->"},
        )
    )
    assert data.label_names is None and isinstance(data.splits["train"]["label"][0], str)
    # a larger init so the tiny LM head can express confident next-token distributions
    model = AdapterModel(
        tiny("llama", vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, initializer_range=0.5)
    )
    torch.manual_seed(0)
    model.add_adapter("echo", LoraConfig(r=8, alpha=16, targets="all-linear"))
    trainer, before = _train(model, tok, {"echo": data}, _cfg(tmp_path, steps=80, lr=5e-2))
    after = trainer.evaluate("echo")
    assert set(after) == {"loss", "perplexity", "score"}
    assert after["perplexity"] < before["echo"]["perplexity"] / 2, (before, after)


def test_causal_and_head_tasks_are_not_mixed(tmp_path, tok):
    gen = load_task(TaskSpec(name="g", source=_topic_csv(tmp_path / "a.csv"), kind="causal_lm"))
    cls = load_task(TaskSpec(name="c", source=_topic_csv(tmp_path / "b.csv")))
    model = AdapterModel(tiny("llama", vocab_size=tok.vocab_size))
    model.add_adapter("g", LoraConfig(r=2, targets=LORA_TARGETS["llama"]))
    model.add_adapter("c", LoraConfig(r=2, targets=LORA_TARGETS["llama"]), head=cls.head_config())
    with pytest.raises(ValueError, match="causal_lm tasks .* cannot be trained with head tasks"):
        MultiTaskTrainer(model, tok, {"g": gen, "c": cls}, _cfg(tmp_path))
