"""Task specs, packaged corpora, deterministic splits, tokenization and metrics."""

from __future__ import annotations

import pytest
from helpers import minilm_tokenizer

from adapters_mtl.data.tasks import TaskSpec, accuracy, classification_report, load_task, macro_f1


def test_bbc_news_loads_with_deterministic_disjoint_splits(tmp_path):
    spec = TaskSpec(name="news", source="bbc_news", seed=3)
    a, b = load_task(spec), load_task(spec)
    assert a.label_names == ("business", "entertainment", "politics", "sports", "tech")
    sizes = {k: len(v) for k, v in a.indices.items()}
    assert sum(sizes.values()) == 2225 and sizes["train"] == 1780
    assert a.indices == b.indices  # same seed, same split
    all_idx = a.indices["train"] + a.indices["validation"] + a.indices["test"]
    assert len(set(all_idx)) == len(all_idx)
    assert load_task(TaskSpec(name="news", source="bbc_news", seed=4)).indices != a.indices
    assert a.splits["train"][0]["text"] and isinstance(a.splits["train"][0]["label"], int)
    a.save_indices(tmp_path / "split.json")
    assert "indices" in (tmp_path / "split.json").read_text()
    assert a.head_config().num_labels == 5


def test_tweets_deduplicated_and_subsampled():
    data = load_task(TaskSpec(name="tone", source="tweet_sentiment", limit=1000))
    assert sum(len(v) for v in data.indices.values()) == 1000
    texts = [t for split in data.splits.values() for t in split["text"]]
    assert len(set(texts)) == len(texts)
    assert len(data.label_names) == 3


def test_local_csv_and_clear_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sentence,score\n" + "\n".join(f"text {i},{i % 3}" for i in range(30)))
    data = load_task(
        TaskSpec(
            name="csv",
            source=str(path),
            text_column="sentence",
            label_column="score",
            label_names=("0", "1", "2"),
        )
    )
    assert sum(len(v) for v in data.splits.values()) == 30
    reg = load_task(
        TaskSpec(
            name="reg", source=str(path), kind="regression", text_column="sentence", label_column="score"
        )
    )
    assert isinstance(reg.splits["train"][0]["label"], float) and reg.head_config().kind == "regression"
    with pytest.raises(KeyError, match=r"columns \['text'\] not in .*available: \['sentence', 'score'\]"):
        load_task(TaskSpec(name="csv", source=str(path), label_column="score"))
    with pytest.raises(ValueError, match=r"labels \['2'\] are not in label_names"):
        load_task(
            TaskSpec(
                name="csv",
                source=str(path),
                text_column="sentence",
                label_column="score",
                label_names=("0", "1"),
            )
        )
    with pytest.raises(FileNotFoundError, match="not a packaged corpus"):
        load_task(TaskSpec(name="x", source="nowhere.txt"))
    with pytest.raises(ValueError, match=r"kind 'ner' is not supported.*splits must be"):
        TaskSpec(name="x", source="bbc_news", kind="ner", splits=(0.5, 0.5, 0.5))


def test_encode_for_a_tokenizer():
    from transformers import DataCollatorWithPadding

    tok = minilm_tokenizer()
    data = load_task(TaskSpec(name="news", source="bbc_news", limit=40, max_length=16))
    enc = data.encode(tok, "train")
    batch = DataCollatorWithPadding(tok)([enc[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 16
    assert batch["labels"].tolist() == list(data.splits["train"]["label"])[:4]


def test_metrics_by_hand():
    pred, gold = [0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 0]
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    rep = classification_report(pred, gold, ["a", "b", "c"])
    assert rep["c"] == {"precision": 2 / 3, "recall": 2 / 3, "f1": pytest.approx(2 / 3), "support": 3}
    assert rep["b"]["precision"] == 0.5 and rep["b"]["recall"] == 1.0
    assert macro_f1(pred, gold, ["a", "b", "c"]) == pytest.approx((2 / 3 + 2 / 3 + 2 / 3) / 3)
