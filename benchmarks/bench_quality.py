"""Quality on real data: every recipe run on the real MiniLM-L6 and the packaged corpora, one table.

Runs, in one process and one fresh registry (``--out``, default runs/quality):
  full fine-tuning (full_finetune_baseline), single-task LoRA (single_task_lora), prefix for news + LoRA
  for tone (prefix_and_lora), joint MTL with shared + task adapters under static and uncertainty
  weights (joint_mtl), adversarial MTL with DWA (adversarial_mtl), few-shot composition of the
  published single-task adapters for an unseen task (compose_unseen), and the bare base "zero-shot"
  (nearest centroid of the label names' embeddings: no training at all).
Every training recipe gets the same number of steps of 16 rows (``--steps``), so each task sees about
the same number of rows in every run. Prints a markdown table and writes JSON. Usage:
  python benchmarks/bench_quality.py [--steps 400] [--out runs/quality]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from adapters_mtl.data.tasks import TaskSpec

RECIPES = Path(__file__).parents[1] / "recipes"
RUNS = [  # (label, recipe, extra overrides)
    ("full fine-tuning", "full_finetune_baseline.yaml", []),
    ("single-task LoRA", "single_task_lora.yaml", []),
    ("prefix (news) + LoRA (tone)", "prefix_and_lora.yaml", []),
    ("joint MTL, shared+task, static", "joint_mtl.yaml", ["train.weighting=static"]),
    ("joint MTL, shared+task, uncertainty", "joint_mtl.yaml", ["train.weighting=uncertainty"]),
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


def main(argv: list[str] | None = None) -> None:
    from adapters_mtl.apps.recipe import load_recipe, run_recipe

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--only", nargs="*", help="labels of the runs to do (default: all)")
    args = parser.parse_args(argv)
    registry = args.out / "registry"
    rows = []
    for label, recipe, extra in RUNS:
        if args.only and label not in args.only:
            continue
        out = args.out / label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace(
            "+", ""
        )
        overrides = [
            f"train.steps={args.steps}",
            f"train.eval_every={max(args.steps // 4, 1)}",
            f"train.output_dir={out}",
            f"registry={registry}",
            *extra,
        ]
        t0 = time.perf_counter()
        summary = run_recipe(load_recipe(RECIPES / recipe, overrides), overwrite=True)
        seconds = time.perf_counter() - t0
        sizes = {}
        for task, ref in summary["published"].items():
            from adapters_mtl.registry import AdapterRegistry

            rec = AdapterRegistry(registry).resolve(ref)
            sizes[task] = sum(f.stat().st_size for f in Path(rec.path).rglob("*") if f.is_file()) / 1024
        rows.append(
            {
                "run": label,
                "recipe": recipe,
                "seconds": seconds,
                "trainable_params": summary["trainable_params"],
                "base_params": summary["base_params"],
                "published": summary["published"],
                "kib": sizes,
                "test": {
                    t: {k: v for k, v in m.items() if k in ("accuracy", "macro_f1")}
                    for t, m in summary["test"].items()
                },
            }
        )
        print(f"  {label}: {rows[-1]['test']} ({seconds:.0f} s)", flush=True)
    spec = load_recipe(RECIPES / "single_task_lora.yaml")
    zero = {t.name: base_zero_shot(t) for t in spec["tasks"]}
    rows.append({"run": "base zero-shot (label-name centroids)", "test": zero, "trainable_params": 0})
    compose = None
    if not args.only or "compose" in args.only:
        compose_recipe = load_recipe(
            RECIPES / "compose_unseen.yaml",
            [
                f"registry={registry}",
                f"compose.output_dir={args.out / 'compose'}",
                "compose.adapters=[news@1, tone@1]",
            ],
        )
        compose = run_recipe(compose_recipe, overwrite=True)
        print(f"  compose: {compose['test_accuracy']} weights {compose['weights']}", flush=True)
    print(f"\n## Test results, real MiniLM-L6, {args.steps} steps of 16 rows per training run\n")
    print(
        "| run | news acc | news macro-F1 | tone acc | tone macro-F1 | trainable params (% of base) | adapter KiB | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r["test"]
        share = (
            f"{r['trainable_params']:,} ({100 * r['trainable_params'] / r['base_params']:.2f} %)"
            if r.get("base_params")
            else "0"
        )
        kib = " / ".join(f"{v:.0f}" for v in r.get("kib", {}).values()) or "-"
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        print(
            f"| {r['run']} | {t['news']['accuracy']:.3f} | {t['news']['macro_f1']:.3f} | "
            f"{t['tone']['accuracy']:.3f} | {t['tone']['macro_f1']:.3f} | {share} | {kib} | {secs} |"
        )
    if compose is not None:
        print(f"\n## Few-shot composition for tweet polarity ({compose['shots']} examples), test accuracy\n")
        print(
            "| composed | bare base | "
            + " | ".join(k for k in compose["test_accuracy"] if k not in ("composed", "base"))
            + " |"
        )
        print("|---:|---:|" + "---:|" * (len(compose["test_accuracy"]) - 2))
        acc = compose["test_accuracy"]
        print(
            f"| {acc['composed']:.3f} | {acc['base']:.3f} | "
            + " | ".join(f"{v:.3f}" for k, v in acc.items() if k not in ("composed", "base"))
            + " |"
        )
        print(f"\nweights: {compose['weights']}")
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "runs": rows,
        "compose": compose,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = Path(__file__).parent / "results" / "bench_quality.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
