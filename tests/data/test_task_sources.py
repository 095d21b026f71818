"""Data as users have it: separate train/validation/test sources (a mapping or a folder of split files),
sentence pairs, label names from a ClassLabel column, and clear errors before training for empty splits
and test labels that train never shows."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import minilm_tokenizer

from adapters_mtl.data.tasks import TaskSpec, load_task


def _csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _rows(n: int, labels: tuple[str, ...] = ("yes", "no"), start: int = 0) -> list[dict]:
    return [
        {"premise": f"sentence {i}", "hypothesis": f"claim {i}", "label": labels[i % len(labels)]}
        for i in range(start, start + n)
    ]


def test_separate_split_files_are_used_as_they_are_and_validation_is_cut_from_train(tmp_path):
    train, test = _csv(tmp_path / "tr.csv", _rows(40)), _csv(tmp_path / "te.csv", _rows(10, start=100))
    spec = TaskSpec(
        name="t", source={"train": train, "test": test}, text_column="premise", splits=(0.8, 0.2, 0.0)
    )
    data = load_task(spec)
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes == {"train": 32, "validation": 8, "test": 10}  # 0.2 / (0.8 + 0.2) of train is validation
    assert set(data.splits["test"]["text"]) == {
        f"sentence {i}" for i in range(100, 110)
    }  # test is the test file
    assert not set(data.splits["train"]["text"]) & set(data.splits["validation"]["text"])
    assert data.label_names == ("no", "yes")
    assert load_task(spec).indices == data.indices  # seeded


def test_a_folder_of_split_files_and_a_given_validation(tmp_path):
    _csv(tmp_path / "train.csv", _rows(20))
    _csv(tmp_path / "dev.csv", _rows(6, start=50))
    _csv(tmp_path / "test.csv", _rows(8, start=100))
    data = load_task(TaskSpec(name="t", source=str(tmp_path), text_column="premise"))
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 20, "validation": 6, "test": 8}
    assert data.splits["validation"]["text"][0].startswith("sentence 5")
    (tmp_path / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \['test'\] file"):
        load_task(TaskSpec(name="t", source=str(tmp_path), text_column="premise"))


def test_sentence_pairs_are_tokenized_as_pairs(tmp_path):
    src = _csv(tmp_path / "nli.csv", _rows(30))
    spec = TaskSpec(name="nli", source=src, text_column="premise", text_pair_column="hypothesis")
    data = load_task(spec)
    assert data.splits["train"]["text_pair"][0].startswith("claim")
    tok = minilm_tokenizer()
    enc = data.encode(tok, "train")
    row = enc[0]
    assert row["input_ids"].count(tok.sep_token_id) == 2  # [CLS] premise [SEP] hypothesis [SEP]
    assert set(row["token_type_ids"]) == {0, 1}
    want = tok(data.splits["train"]["text"][0], data.splits["train"]["text_pair"][0])["input_ids"]
    assert row["input_ids"] == want
    with pytest.raises(ValueError, match="text_pair_column works with kind seq_cls or regression"):
        TaskSpec(name="x", source=src, kind="token_cls", text_pair_column="hypothesis")


def test_label_names_come_from_a_class_label_column(tmp_path):
    import datasets

    feats = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    ds = datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(30)], "label": [i % 2 for i in range(30)]}, feats
    )
    ds.to_parquet(str(tmp_path / "d.parquet"))
    data = load_task(TaskSpec(name="c", source=str(tmp_path / "d.parquet")))
    # parquet keeps the ClassLabel feature: the data's own names and order, not sorted ids "0", "1"
    assert data.label_names == ("neg", "pos")
    assert set(data.splits["train"]["label"]) == {0, 1}


def test_unseen_test_labels_fail_before_training(tmp_path):
    src = _csv(tmp_path / "d.csv", _rows(4))
    data = load_task(TaskSpec(name="t", source=src, text_column="premise", splits=(0.75, 0.0, 0.25)))
    assert len(data.splits["validation"]) == 0  # composition needs none; the trainer refuses (test_schedules)
    train = _csv(tmp_path / "tr.csv", _rows(10, labels=("a", "b")))
    test = _csv(tmp_path / "te.csv", _rows(6, labels=("a", "b", "c")))
    with pytest.raises(ValueError, match=r"test labels \['c'\] never occur in the train split"):
        load_task(TaskSpec(name="t", source={"train": train, "test": test}, text_column="premise"))
    bad = [
        ({"train": train}, r"without \['test'\]"),
        ({"train": train, "test": test, "dev": test}, r"unknown split\(s\) \['dev'\]"),
        ({"train": "bbc_news", "test": test}, "packaged corpus"),
    ]
    for source, reason in bad:
        with pytest.raises(ValueError, match=reason):
            TaskSpec(name="t", source=source)


def test_a_recipe_takes_split_sources_and_pairs(tmp_path):
    from adapters_mtl.apps.recipe import load_recipe

    train, test = _csv(tmp_path / "tr.csv", _rows(20)), _csv(tmp_path / "te.csv", _rows(6))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "base: minilm\ntasks:\n  - name: nli\n    source: {train: "
        + train
        + ", test: "
        + test
        + "}\n    text_column: premise\n    text_pair_column: hypothesis\ntrain: {steps: 2}\n"
    )
    spec = load_recipe(recipe)["tasks"][0]
    assert spec.source == {"train": train, "test": test} and spec.text_pair_column == "hypothesis"


def test_bbc_pairs_match_each_headline_with_its_paragraph_and_another_of_its_topic():
    from adapters_mtl.data.tasks import PACKAGED

    spec = TaskSpec(name="pairs", source="bbc_news", extra={"pairs": True}, text_pair_column="text_pair")
    rows = PACKAGED["bbc_news"](spec)
    topics = {r["text"]: r["label"] for r in PACKAGED["bbc_news"](TaskSpec(name="t", source="bbc_news"))}
    # 2,225 articles, 2,105 distinct (headline, first paragraph) within their topic: a pair each way
    assert len(rows) == 2 * 2105 and [r["label"] for r in rows[:2]] == ["match", "mismatch"]
    matches = [(r["text"], r["text_pair"]) for r in rows if r["label"] == "match"]
    assert len(set(matches)) == len(matches)  # no pair twice: none can sit in two splits
    owners: dict[str, set[str]] = {}  # paragraph -> the headlines it belongs to
    for headline, paragraph in matches:
        owners.setdefault(paragraph, set()).add(headline)
    for match, mismatch in zip(rows[::2], rows[1::2], strict=True):
        assert match["text"] == mismatch["text"] and match["text_pair"] != mismatch["text_pair"]
        other = owners[mismatch["text_pair"]]  # the articles the wrong paragraph comes from: same topic
        assert match["text"] not in other and {topics[h] for h in other} == {topics[match["text"]]}
    assert PACKAGED["bbc_news"](spec) == rows  # seeded
    tok = minilm_tokenizer()
    data = load_task(spec)
    enc = data.encode(tok, "test")
    first = data.splits["test"][0]
    want = tok(first["text"], first["text_pair"], truncation=True, max_length=spec.max_length)["input_ids"]
    assert enc[0]["input_ids"] == want and tok.sep_token_id in enc[0]["input_ids"][1:-1]  # one pair
