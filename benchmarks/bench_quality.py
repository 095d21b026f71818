"""Quality on real data: the recipes run on the real MiniLM-L6 and the packaged corpora, several seeds, one table.

Every run uses the same tasks and splits, with at least 400 test texts per task (``DATA``: all 2,225 BBC
articles split 70/10/20 -> 445 test headlines; 2,050 tweets split 60/20/20 -> 410 test tweets), the same
number of steps of 16 rows (``--steps``, so each task sees about the same number of rows in every run) and
``--seeds`` training seeds (the splits stay fixed; the seed changes adapter/head initialisation, dropout and
the batch order). Runs:
  full fine-tuning (full_finetune_baseline), single-task LoRA (single_task_lora: all linear layers, linear
  schedule; and on query/value with a constant rate, the joint runs' trainable budget), joint MTL with a shared +
  task adapters (joint_mtl) under static, uncertainty, DWA and UPGrad weighting, soft sharing (one LoRA per
  task pulled towards the tasks' mean, joint_mtl with sharing: soft); with ``--only`` also the prefix +
  LoRA and adversarial recipes; the majority class and the bare base "zero-shot" (nearest centroid of the
  label names' embeddings) as floors.
``--news-field body`` trains and tests news on the article body (first 256 tokens) instead of the headline.
Prints a markdown table of mean ± std over the seeds, the goals read from it, and writes JSON. Usage:
  python benchmarks/bench_quality.py [--steps 400] [--seeds 0 1 2] [--news-field headline|body]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from adapters_mtl.data.tasks import TaskSpec

RECIPES = Path(__file__).parents[1] / "recipes"
TASKS = ("news", "tone")
DATA = [  # the same tasks and splits in every run: >= 400 test texts per task
    "tasks.0.limit=null",
    "tasks.0.splits=[0.7,0.1,0.2]",  # news: 2,225 articles -> 445 test headlines
    "tasks.1.limit=2050",
    "tasks.1.splits=[0.6,0.2,0.2]",  # tone: 2,050 tweets -> 1,230 / 410 / 410
]
BODY = ["tasks.0.extra.field=body", "tasks.0.max_length=256"]
QV = ["adapter.lora.targets=[query,value]", "train.scheduler=constant", "train.warmup_ratio=0"]
SOFT = ["train.sharing=soft", "train.weighting=static", "adapter.lora.r=8", "adapter.lora.alpha=16"]
RUNS = [  # (label, recipe, extra overrides); equal trainable budgets for the adapter runs
    ("full fine-tuning", "full_finetune_baseline.yaml", []),
    ("single-task LoRA", "single_task_lora.yaml", []),
    ("single-task LoRA, query+value, constant lr", "single_task_lora.yaml", QV),
    ("joint MTL, shared+task, static", "joint_mtl.yaml", ["train.weighting=static"]),
    ("joint MTL, shared+task, uncertainty", "joint_mtl.yaml", ["train.weighting=uncertainty"]),
    ("joint MTL, shared+task, DWA", "joint_mtl.yaml", ["train.weighting=dwa"]),
    ("joint MTL, shared+task, UPGrad", "joint_mtl.yaml", ["train.weighting=upgrad"]),
    ("soft sharing, LoRA per task", "joint_mtl.yaml", SOFT),
]
EQUAL_BUDGET = RUNS[2][0]  # the single-task adapters with the joint runs' trainable budget
OPTIONAL = [  # only with --only
    ("prefix (news) + LoRA (tone)", "prefix_and_lora.yaml", []),
    ("adversarial MTL, DWA", "adversarial_mtl.yaml", []),
]


@torch.no_grad()
def base_zero_shot(task: TaskSpec) -> dict:
    """Accuracy of the bare MiniLM with label-name centroids (mean-pooled embeddings), no training."""
    from adapters_mtl.core.heads import pool
    from adapters_mtl.data.bases import load_minilm
    from adapters_mtl.data.tasks import accuracy, load_task, macro_f1

    model, tok = load_minilm()
    data = load_task(task)

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), 64):
            enc = tok(
                list(texts[i : i + 64]), padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
            out.append(pool(model(**enc).last_hidden_state, enc["attention_mask"], "mean", None))
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    test = data.splits["test"]
    pred = (embed(test["text"]) @ embed(list(data.label_names)).T).argmax(1).numpy()
    return {
        "accuracy": accuracy(pred, test["label"]),
        "macro_f1": macro_f1(pred, test["label"], data.label_names),
    }


def majority(task: TaskSpec) -> dict:
    """Accuracy and macro-F1 of always predicting the training split's most frequent label."""
    from adapters_mtl.data.tasks import accuracy, load_task, macro_f1

    data = load_task(task)
    top = Counter(data.splits["train"]["label"]).most_common(1)[0][0]
    test = data.splits["test"]
    pred = [top] * len(test)
    return {
        "accuracy": accuracy(pred, test["label"]),
        "macro_f1": macro_f1(pred, test["label"], data.label_names),
        "test_rows": len(test),
    }


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float]) -> str:
    mean, std = _stats(values)
    return f"{mean:.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:.3f}"


def main(argv: list[str] | None = None) -> None:
    from adapters_mtl.apps.recipe import load_recipe, run_recipe

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--news-field", choices=("headline", "body"), default="headline")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--only", nargs="*", help="labels of the runs to do (default: all but the optional)")
    parser.add_argument("--json", type=Path, help="where to write the JSON (default benchmarks/results/)")
    args = parser.parse_args(argv)
    data = DATA + (BODY if args.news_field == "body" else [])
    runs = [r for r in RUNS + OPTIONAL if (r in RUNS if not args.only else r[0] in args.only)]
    rows = []
    for label, recipe, extra in runs:
        per_seed = []
        for seed in args.seeds:
            overrides = [
                *data,
                f"train.steps={args.steps}",
                f"train.eval_every={max(args.steps // 4, 1)}",
                f"train.seed={seed}",
                f"train.output_dir={args.out / _slug(label) / f'seed{seed}'}",
                "train.checkpoint_every=null",
                "registry=null",
                *extra,
            ]
            t0 = time.perf_counter()
            summary = run_recipe(load_recipe(RECIPES / recipe, overrides), overwrite=True)
            seconds = time.perf_counter() - t0
            test = {
                t: {k: float(v) for k, v in m.items() if k in ("accuracy", "macro_f1")}
                for t, m in summary["test"].items()
            }
            per_seed.append({"seed": seed, "seconds": seconds, "test": test})
            print(f"  {label}, seed {seed}: {test} ({seconds:.0f} s)", flush=True)
        rows.append(
            {
                "run": label,
                "recipe": recipe,
                "overrides": extra,
                "trainable_params": summary["trainable_params"],
                "base_params": summary["base_params"],
                "seeds": per_seed,
            }
        )
    spec = load_recipe(RECIPES / "single_task_lora.yaml", data)
    floors = {
        "majority class": {t.name: majority(t) for t in spec["tasks"]},
        "base zero-shot (label-name centroids)": {t.name: base_zero_shot(t) for t in spec["tasks"]},
    }
    when = datetime.date.today().isoformat()
    print(
        f"\n## Test results, real MiniLM-L6, {args.steps} steps of 16 rows per run, seeds {args.seeds}, "
        f"news {args.news_field}, {when}\n"
    )
    print(
        "| run | news acc | news macro-F1 | tone acc | tone macro-F1 | mean acc | trainable params | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    means: dict[str, list[float]] = {}
    for r in rows:
        seeds = r["seeds"]
        cells = [_cell([s["test"][t][m] for s in seeds]) for t in TASKS for m in ("accuracy", "macro_f1")]
        means[r["run"]] = [statistics.fmean(s["test"][t]["accuracy"] for t in TASKS) for s in seeds]
        share = f"{r['trainable_params']:,} ({100 * r['trainable_params'] / r['base_params']:.2f} %)"
        secs = statistics.fmean(s["seconds"] for s in seeds)
        print(f"| {r['run']} | {' | '.join(cells)} | {_cell(means[r['run']])} | {share} | {secs:.0f} |")
    for label, per_task in floors.items():
        cells = [f"{per_task[t][m]:.3f}" for t in TASKS for m in ("accuracy", "macro_f1")]
        mean = statistics.fmean(per_task[t]["accuracy"] for t in TASKS)
        print(f"| {label} | {' | '.join(cells)} | {mean:.3f} | 0 | - |")
    goals = _goals(rows, means)
    if goals:
        print("\nGoals (mean over seeds; ± the std of the per-seed differences, seeds paired by index):")
        for line in goals:
            print(f"* {line}")
    result = {
        "date": when,
        "command": " ".join(
            ["python benchmarks/bench_quality.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "seeds": args.seeds,
        "news_field": args.news_field,
        "data": data,
        "test_rows": {t: floors["majority class"][t]["test_rows"] for t in TASKS},
        "runs": rows,
        "floors": floors,
        "goals": goals,
    }
    suffix = "" if args.news_field == "headline" else f"_{args.news_field}"
    path = args.json or Path(__file__).parent / "results" / f"bench_quality{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwrote {path}")


def _goals(rows: list[dict], means: dict[str, list[float]]) -> list[str]:
    """The issue's goals, read from the table: LoRA within 1 point of full fine-tuning on each task, and
    every joint run's mean accuracy at least the single-task adapters' mean."""
    by = {r["run"]: r for r in rows}
    out = []
    ft, lora = by.get("full fine-tuning"), by.get("single-task LoRA")
    if ft and lora and len(ft["seeds"]) == len(lora["seeds"]):
        for t in TASKS:
            diff = [
                b["test"][t]["accuracy"] - a["test"][t]["accuracy"]
                for a, b in zip(ft["seeds"], lora["seeds"], strict=True)
            ]
            mean, std = _stats(diff)
            verdict = "met on the mean" if mean >= -0.01 else f"missed by {100 * (-0.01 - mean):.1f} points"
            out.append(
                f"LoRA − full fine-tuning, {t}: {100 * mean:+.1f} ± {100 * std:.1f} points ({verdict}; goal ≥ −1)"
            )
    equal = next((r for r in (EQUAL_BUDGET, "single-task LoRA") if r in means), None)
    if equal:  # joint runs against the single-task adapters of the same trainable budget
        single = means[equal]
        for run, values in means.items():
            if not run.startswith(("joint", "soft", "adversarial", "prefix")) or len(values) != len(single):
                continue
            mean, std = _stats([a - b for a, b in zip(values, single, strict=True)])
            verdict = "met on the mean" if mean >= 0 else f"missed by {100 * -mean:.1f} points"
            out.append(
                f"{run} − {equal} mean accuracy: {100 * mean:+.1f} ± {100 * std:.1f} points ({verdict}; goal ≥ 0)"
            )
    return out


if __name__ == "__main__":
    main()
