"""Composer: registry adapters loaded lazily under an LRU budget, O(1) switching, routed predict and
generate equal to each adapter alone, merges from registry adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LORA_TARGETS, classifier_registry, composer, minilm_tokenizer, tiny

from adapters_mtl import AdapterModel, LoraConfig, PrefixConfig
from adapters_mtl.serving.composer import Composer, ComposerError

TEXTS = ["the match ended in a draw", "parliament votes today", "what a lovely day", "stocks fell sharply"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny BERT with the real MiniLM tokenizer, and a registry holding 4 classifiers + a prefix one."""
    labels = [("sport", "politics"), ("pos", "neg", "neutral"), ("a", "b"), ("x", "y")]
    base, tok, registry, trainer = classifier_registry(
        tmp_path_factory.mktemp("reg"), labels, prefix_labels=2
    )
    with torch.no_grad():  # a second version of task0
        for p in trainer.adapter_parameters("task0").values():
            p.mul_(-1)
    registry.publish(trainer, adapter="task0", task="task0")
    return base, tok, registry


def _saved_base(world, tmp_path):
    """The tiny base and its tokenizer as a model folder (what the CLI's --base takes)."""
    base, tok, _ = world
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_routed_predict_equals_each_adapter_alone_with_its_labels(world):
    c = composer(world)
    refs = ["task0@1", "task1", "pre", "task0"]  # task0 = latest = version 2
    mixed = c.predict(TEXTS, adapters=refs)
    assert [p.adapter for p in mixed] == ["task0@1", "task1@1", "pre@1", "task0@2"]
    assert set(mixed[1].scores) == {"pos", "neg", "neutral"} and mixed[1].label in mixed[1].scores
    for text, ref, got in zip(TEXTS, refs, mixed, strict=True):
        with c.using(ref):
            alone = c.predict([text])[0]
        assert alone.label == got.label and alone.score == pytest.approx(got.score, abs=1e-5)
        torch.testing.assert_close(
            torch.tensor(list(alone.scores.values())),
            torch.tensor(list(got.scores.values())),
            atol=1e-5,
            rtol=0,
        )
    assert mixed[0].scores != mixed[3].scores  # two versions of one name coexist


def test_lru_budget_evicts_least_recent_never_pinned_and_reloads_transparently(world):
    c = composer(world, max_adapters=2)
    first = c.predict(TEXTS[:1], adapters="task1")[0]
    c.pin("task2")
    c.load("task3")  # budget 2: task1 (least recent, unpinned) goes
    assert [e["ref"] for e in c.loaded] == ["task2@1", "task3@1"]
    assert c.predict(TEXTS[:1], adapters="task1")[0] == first  # reloaded on use, same answer
    assert [e["ref"] for e in c.loaded] == ["task2@1", "task1@1"] and c.loaded[0]["pinned"]
    with pytest.raises(ComposerError, match="budget .* cannot hold"):
        c.predict(TEXTS[:3], adapters=["task0", "task3", "task1"])  # 3 in one batch + pinned task2
    c2 = composer(world, max_bytes=1)
    with pytest.raises(ComposerError, match="cannot hold"):
        c2.load("task1")
    assert c2.loaded == [] and c2.model.adapter_names == []  # nothing half-loaded


def test_switching_does_not_touch_the_registry_once_loaded(world, monkeypatch):
    c = composer(world)
    c.load("task1")
    c.load("task2")

    def boom(*_args, **_kwargs):
        raise AssertionError("registry consulted")

    monkeypatch.setattr(c.registry, "resolve", boom)
    for _ in range(3):
        assert c.use("task1") == "task1" and c.use("task2") == "task2"
    with c.using("task1"):
        assert c.active == "task1"
    assert c.active == "task2"
    c.use(None)
    assert c.active is None


def test_bad_requests_are_clear(world):
    c = composer(world)
    from adapters_mtl.registry import RegistryError

    with pytest.raises(RegistryError, match="no adapter named 'nope'"):
        c.predict(TEXTS[:1], adapters="nope")
    with pytest.raises(ComposerError, match="got 2 adapters for 1 rows"):
        c.predict(TEXTS[:1], adapters=["task1", "task2"])
    with pytest.raises(ComposerError, match=r"have no classification head"):
        c.predict(TEXTS[:1])  # the bare base
    before = [e["ref"] for e in c.loaded]
    with pytest.raises(ValueError, match="only LoRA adapters can be merged"):
        c.merge(["task1", "pre"], into="mix")
    with pytest.raises(ValueError, match="got 1 weights for 2 adapters"):
        c.merge(["task1", "task2"], weights=[1.0], into="mix")
    assert "mix" not in c.model.adapter_names and [e["ref"] for e in c.loaded][: len(before)] == before


def test_merge_into_a_new_adapter_and_into_the_base_and_back(world):
    c = composer(world)
    x = c.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        bare = c.model(**x, adapters=None).last_hidden_state
    c.merge(["task2", "task3"], weights=[0.5, 0.5], method="cat", into="mix")
    with torch.no_grad():
        want = c.model(**x, adapters="mix").last_hidden_state
        c.merge(["task2", "task3"], weights=[0.5, 0.5], method="cat", into="base")
        torch.testing.assert_close(c.model(**x).last_hidden_state, want, atol=1e-5, rtol=0)
        c.unmerge()
        assert torch.equal(c.model(**x, adapters=None).last_hidden_state, bare)  # bit-exact
    assert c.predict(TEXTS[:1], adapters="mix")[0].label in ("x", "y")  # the last adapter's head


def test_routed_generate_equals_each_adapter_alone():
    tok = minilm_tokenizer()
    base = tiny("llama", vocab_size=tok.vocab_size).eval()
    model = AdapterModel(base)
    torch.manual_seed(0)
    model.add_adapter("a", LoraConfig(r=4, targets=LORA_TARGETS["llama"], init="random"))
    model.add_adapter("b", LoraConfig(r=2, targets=LORA_TARGETS["llama"], init="random"))
    model.add_adapter("p", PrefixConfig(num_virtual_tokens=2))
    with torch.no_grad():
        for p in model.adapter_parameters("a").values():
            p.mul_(30)  # large enough to change greedy tokens
    c = Composer(model, registry=None, tokenizer=tok)
    prompts = ["hello there", "a much longer prompt about things", "one", "two words"]
    refs = ["a", "b", "p", None]
    mixed = c.generate(prompts, adapters=refs, max_new_tokens=5)
    alone = [c.generate([p], adapters=[r], max_new_tokens=5)[0] for p, r in zip(prompts, refs, strict=True)]
    assert mixed == alone
    assert mixed[0] != c.generate(prompts[:1], adapters=[None], max_new_tokens=5)[0]


def test_cli_predict_and_merge(world, tmp_path, capsys):
    import json

    from adapters_mtl.apps.cli import main

    _, _, registry = world
    folder = _saved_base(world, tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:2]) + "\n")
    common = ["--base", str(folder), "--registry", str(registry.url), "--json"]
    assert main(["predict", str(texts), "extra text", "-a", "task1", "-a", "task0@1", *common]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["text"], r["adapter"]) for r in rows][:3] == [
        (TEXTS[0], "task1@1"),
        (TEXTS[0], "task0@1"),
        (TEXTS[1], "task1@1"),
    ]
    assert len(rows) == 6 and rows[0]["label"] in ("pos", "neg", "neutral")
    code = main(
        [
            "merge",
            "-a",
            "task2",
            "-a",
            "task3",
            "-w",
            "0.5",
            "0.5",
            "--method",
            "ties",
            "--density",
            "0.5",
            "--name",
            "mix",
            *common,
        ]
    )
    assert code == 0 and json.loads(capsys.readouterr().out) == {
        "ref": "mix@1",
        "sources": ["task2@1", "task3@1"],
    }
    assert registry.show("mix")["card"]["description"].startswith("ties merge of ['task2@1', 'task3@1']")
    assert main(["predict", "x", "-a", "nope", *common]) == 2
    assert "no adapter named 'nope'" in capsys.readouterr().err


def test_few_shot_composition_is_a_cat_merge_with_a_nearest_centroid_head(world):
    import numpy as np

    from adapters_mtl.serving.lorahub import compose
    from adapters_mtl.serving.merging import merge_adapters

    c = composer(world)
    texts = ["good game", "great win", "bad loss", "awful defeat", "nice goal", "poor show"]
    labels = ["pos", "pos", "neg", "neg", "pos", "neg"]
    result = compose(
        c,
        ["task1", "task2", "task3"],
        texts,
        labels,
        budget=12,
        seed=3,
        eval_texts=texts[:4],
        eval_labels=labels[:4],
    )
    assert result.evaluations == 12 and set(result.weights) == {"task1@1", "task2@1", "task3@1"}
    assert set(result.accuracy) == {"composed", "base", "task1@1", "task2@1", "task3@1"}
    again = compose(composer(world), ["task1", "task2", "task3"], texts, labels, budget=12, seed=3)
    assert again.weights == result.weights  # seeded search
    merge_adapters(
        c.model, ["task1", "task2", "task3"], list(result.weights.values()), "cat", into="ref", head=None
    )
    x = c.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = c.model(**x, adapters="composed").last_hidden_state
        torch.testing.assert_close(hidden, c.model(**x, adapters="ref").last_hidden_state, atol=1e-5, rtol=0)
        mask = x["attention_mask"].unsqueeze(-1).float()
        h = (hidden * mask).sum(1) / mask.sum(1)
        mu = torch.stack([h[[i for i, v in enumerate(labels) if v == k]].mean(0) for k in ("neg", "pos")])
        want = [("neg", "pos")[i] for i in torch.cdist(h, mu).argmin(1).tolist()]
    assert [p.label for p in c.predict(texts, adapters="composed")] == want
    assert np.isfinite(result.objective)


def test_zero_shot_composition_weights_the_most_similar_description(world):
    from adapters_mtl.serving.lorahub import compose_zero_shot

    base, tok, registry = world
    model = AdapterModel(copy.deepcopy(base))
    for name, desc in (
        ("sportsy", "football match results and league tables"),
        ("moody", "how people feel in tweets"),
    ):
        model.add_adapter(name, LoraConfig(r=2, targets=LORA_TARGETS["bert"], init="random"))
        registry.publish(model, adapter=name, task=name, description=desc)
    c = composer(world)
    result = compose_zero_shot(
        c, ["sportsy", "moody"], "how people feel in tweets", ["happy", "sad"], top_k=1
    )
    assert result.weights == {"sportsy@1": 0.0, "moody@1": 1.0}
    assert [p.label for p in c.predict(["happy", "sad"], adapters="composed")] == ["happy", "sad"]


def test_cli_compose_few_shot_publishes_a_loadable_classifier(world, tmp_path, capsys):
    import json

    from adapters_mtl.apps.cli import main

    _, _, registry = world
    folder = _saved_base(world, tmp_path)
    examples = tmp_path / "ex.csv"
    examples.write_text("text,label\ngood game,pos\nbad loss,neg\ngreat win,pos\nawful defeat,neg\n")
    common = ["--base", str(folder), "--registry", str(registry.url), "--json"]
    code = main(
        [
            "compose",
            "-a",
            "task2",
            "-a",
            "task3",
            "--examples",
            str(examples),
            "--eval",
            str(examples),
            "--budget",
            "6",
            "--name",
            "fewshot",
            *common,
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert (
        code == 0
        and out["ref"] == "fewshot@1"
        and set(out["accuracy"]) == {"composed", "base", "task2@1", "task3@1"}
    )
    c = composer(world)
    assert c.predict(["good game"], adapters="fewshot")[0].label in ("neg", "pos")
    assert main(["compose", "-a", "task2", "--name", "x", *common]) == 2
    assert "needs --examples" in capsys.readouterr().err
