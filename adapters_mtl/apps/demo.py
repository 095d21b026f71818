"""The showcase behind ``make demo``: real model, real data, the whole life of two adapters.

1. Train one LoRA adapter (+ head) per task on the packaged MiniLM-L6 — BBC news topics (5 classes,
   headlines) and tweet sentiment (3 classes) — jointly, in mixed batches routed per row.
2. Evaluate each on its held-out test split (accuracy, macro-F1) and publish both to a local registry.
3. Serve them with the composer: load from the registry, hot-swap, route one mixed batch of real test
   texts (each row its own adapter and head) and check every row against the row run alone; fold an
   adapter into the base weights and back.
4. Print a results table and write the training plot.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

__all__ = ["run_demo"]


def _recipe(steps: int, out: Path, seed: int) -> dict:
    from ..data.tasks import TaskSpec
    from ..methods import LoraConfig
    from ..training.trainer import TrainConfig

    tasks = [
        TaskSpec(name="news", source="bbc_news", limit=1200, max_length=48, seed=seed),
        TaskSpec(name="tone", source="tweet_sentiment", limit=1500, max_length=64, seed=seed),
    ]
    lora = LoraConfig(r=8, alpha=16, targets=("query", "value"))
    train = TrainConfig(
        steps=steps,
        batch_size=16,
        lr=2e-3,
        batching="mixed",
        sampling="proportional",
        eval_every=max(steps // 4, 1),
        seed=seed,
        output_dir=str(out),
    )
    raw = {  # what the recipe file would say (kept in the adapter cards)
        "base": "minilm",
        "tasks": [{"name": t.name, "source": t.source, "limit": t.limit} for t in tasks],
        "adapter": {"lora": {"r": 8, "alpha": 16, "targets": ["query", "value"]}},
        "train": {"steps": steps, "batching": "mixed"},
    }
    return {
        "raw": raw,
        "base": "minilm",
        "tasks": tasks,
        "adapters": {t.name: [lora] for t in tasks},
        "train": train,
        "shared": None,
        "compose": None,
        "registry": str(out / "registry"),
    }


def _folder_kib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1024


def run_demo(seed: int = 0, steps: int = 240, out: str | Path = "runs/demo") -> dict:
    """Run the showcase, print tables, and return its numbers (for tests and scripts)."""
    from rich.console import Console
    from rich.table import Table

    from ..data.bases import load_base
    from ..registry import AdapterRegistry
    from ..serving.composer import Composer
    from .recipe import run_recipe

    console = Console()
    out = Path(out)
    started = time.perf_counter()
    console.rule("[bold]adapters_mtl demo: two LoRA adapters on the real MiniLM-L6 (CPU)")
    console.print(
        "1/3 training [bold]news[/] (BBC topics) and [bold]tone[/] (tweet sentiment) jointly, "
        f"{steps} steps of 16 rows, each row routed to its task's adapter"
    )
    summary = run_recipe(_recipe(steps, out, seed), overwrite=True)  # a demo reruns into the same folder
    registry = AdapterRegistry(out / "registry")

    console.print("2/3 serving the published adapters with the composer")
    base, tokenizer = load_base("minilm")
    composer = Composer(base, registry=registry, tokenizer=tokenizer)
    names = [composer.load(ref) for ref in summary["published"].values()]  # their names in the model
    swaps = []
    for i in range(2000):
        t0 = time.perf_counter()
        composer.use(names[i % len(names)])
        swaps.append((time.perf_counter() - t0) * 1e6)
    swap_us = statistics.median(swaps)
    composer.use(None)

    from ..data.tasks import load_task

    rows = []
    for spec in _recipe(steps, out, seed)["tasks"]:
        data = load_task(spec)
        test = data.splits["test"]
        label_names = data.label_names or ()  # (always set for these classification tasks)
        for i in range(4):
            rows.append((spec.name, test["text"][i], label_names[test["label"][i]]))
    texts, refs = [t for _, t, _ in rows], [summary["published"][n] for n, _, _ in rows]
    mixed = composer.predict(texts, adapters=refs)
    worst = 0.0
    for text, ref, got in zip(texts, refs, mixed, strict=True):
        alone = composer.predict([text], adapters=ref)[0]
        worst = max(worst, max(abs(alone.scores[k] - got.scores[k]) for k in got.scores))
    table = Table(title="One mixed batch of real test texts: each row routed to its own adapter and head")
    for col in ("adapter", "text", "prediction", "gold"):
        table.add_column(col, overflow="fold")
    for (_, text, gold), pred in zip(rows, mixed, strict=True):
        mark = "[green]✓[/]" if pred.label == gold else "[red]✗[/]"
        table.add_row(pred.adapter, text[:80], f"{pred.label} ({pred.score:.2f}) {mark}", gold)
    console.print(table)

    enc = tokenizer(texts[:4], padding=True, return_tensors="pt")
    news = names[0]
    with torch.no_grad():
        unmerged = composer.model(**enc, adapters=news).heads[news].logits
        bare = composer.model(**enc, adapters=None).last_hidden_state
        composer.model.merge(news)
        merged = composer.model(**enc).heads[news].logits
        composer.model.unmerge()
        restored = composer.model(**enc, adapters=None).last_hidden_state
    merge_err = (merged - unmerged).abs().max().item()
    unmerge_exact = bool(torch.equal(bare, restored))

    console.print("3/3 results")
    results = Table(
        title=f"Test results ({summary['steps']} steps, {summary['seconds']:.0f} s of training, seed {seed})"
    )
    for col in (
        "task",
        "test accuracy",
        "macro-F1",
        "trainable params",
        "% of base",
        "adapter files",
        "published",
    ):
        results.add_column(col, justify="right" if col not in ("task", "published") else "left")
    base_params = summary["base_params"]
    per_task = {}
    for task, metrics in summary["test"].items():
        ref = summary["published"][task]
        rec = registry.resolve(ref)
        size = _folder_kib(Path(rec.path))
        trainable = sum(p.numel() for p in composer.model.adapter_parameters(composer.load(ref)).values())
        per_task[task] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "kib": size}
        results.add_row(
            task,
            f"{metrics['accuracy']:.3f}",
            f"{metrics['macro_f1']:.3f}",
            f"{trainable:,}",
            f"{100 * trainable / base_params:.2f}%",
            f"{size:.0f} KiB",
            ref,
        )
    console.print(results)
    checks = Table(title="Checks")
    checks.add_column("check")
    checks.add_column("value", justify="right")
    checks.add_row("max |routed row − same row alone| (probabilities)", f"{worst:.1e}")
    checks.add_row("hot swap: Composer.use(name)", f"{swap_us:.1f} µs")
    checks.add_row("max |merged − unmerged| logits (news)", f"{merge_err:.1e}")
    checks.add_row("unmerge restores the base bit-exact", str(unmerge_exact))
    console.print(checks)
    total = time.perf_counter() - started
    console.print(
        f"Done in {total:.0f} s. Adapters: {out / 'registry'} (try `adapters-mtl registry --root "
        f"{out / 'registry'} list`); plot: {summary['plot']}; metrics: {out / 'results.json'}"
    )
    return {
        "test": per_task,
        "max_routed_diff": worst,
        "swap_us": swap_us,
        "merge_err": merge_err,
        "unmerge_exact": unmerge_exact,
        "published": summary["published"],
        "plot": summary["plot"],
        "seconds": total,
    }
