"""Adapter methods side by side: LoRA, DoRA, AdaLoRA, prefix and prompt tuning, (IA)³ and bottleneck
adapters, ours and PEFT's (where PEFT has the method), in one run.

Model: a Llama with SmolLM2-135M's shapes (random fp32 weights, no download; ``--layers``, default 8).
Per method (PEFT's default-sized configs: LoRA/DoRA r=8 on q_proj+v_proj, AdaLoRA 12 -> 8 ranks there,
prefix and prompt of 16 virtual tokens, IA3 on PEFT's Llama defaults k_proj, v_proj, down_proj, a
Pfeiffer bottleneck of width 64):
  * trainable parameters of one adapter;
  * prefill (B=16, T=64): one adapter unmerged / base, merged / base where the method merges, and PEFT's
    unmerged / base on the same base;
  * a mixed batch of 16 distinct adapters (16 loaded, one per row) / a batch of one adapter, at prefill and at
    decode (B=16, T=1 on a 32-token cache); PEFT's ``adapter_names`` where PEFT has it (LoRA);
  * one training step (forward + backward, B=16, T=64): 16 distinct adapters / one adapter.
Timing as in bench_routing.py: every variant once per round in shuffled order, medians, ratios are
medians of per-round ratios. Goal (issue "More adapter methods"): mixed >= 0.85x single for every method.

Usage:
  python benchmarks/bench_methods.py [--layers 8] [--repeat 7] [--out benchmarks/results/bench_methods.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_routing import build_base, decode_stepper, med, prefill_inputs, ratio, rounds  # noqa: E402

from adapters_mtl import AdapterModel, IA3Config, LoraConfig, PrefixConfig  # noqa: E402
from adapters_mtl.methods import AdaLoraConfig, BottleneckConfig, PromptConfig  # noqa: E402

N = 16  # distinct adapters in a mixed batch (and rows of every batch)
T = 64


def configs() -> dict[str, tuple[Any, Any]]:
    """(ours, PEFT's) config per method, the same adapter in both libraries (PEFT's None: PEFT lacks it)."""
    return {
        "lora": (
            LoraConfig(r=8, alpha=16, targets=("q_proj", "v_proj"), init="random"),
            peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        ),
        "prefix": (
            PrefixConfig(num_virtual_tokens=16),
            peft.PrefixTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM"),
        ),
        "ia3": (IA3Config(init="random"), peft.IA3Config(init_ia3_weights=False)),
        # Pfeiffer placement (after each feed-forward), width 64 = hidden/9 (PEFT has no bottleneck adapters)
        "bottleneck": (BottleneckConfig(placement="pfeiffer", size=64, init="random"), None),
        "dora": (
            LoraConfig(r=8, alpha=16, targets=("q_proj", "v_proj"), init="random", use_dora=True),
            peft.LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=["q_proj", "v_proj"],
                init_lora_weights=False,
                use_dora=True,
            ),
        ),
        "adalora": (
            AdaLoraConfig(init_r=12, target_r=8, targets=("q_proj", "v_proj"), total_step=1000),
            peft.AdaLoraConfig(init_r=12, target_r=8, target_modules=["q_proj", "v_proj"], total_step=1000),
        ),
        "prompt": (
            PromptConfig(num_virtual_tokens=16),
            peft.PromptTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM"),
        ),
    }


def time_method(method: str, ours_cfg: Any, peft_cfg: Any, base: torch.nn.Module, repeat: int) -> dict:
    model = AdapterModel(copy.deepcopy(base)).eval()
    torch.manual_seed(0)
    for i in range(N):
        model.add_adapter(f"a{i}", ours_cfg)
    params = sum(p.numel() for p in model.adapter_parameters("a0").values())
    x = prefill_inputs(N, T)
    mixed = [f"a{i}" for i in range(N)]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg).eval() if peft_cfg is not None else None

    def call(adapters: Any) -> Callable[[], Any]:
        return lambda: model(**x, adapters=adapters, logits_to_keep=1)

    fns: dict[str, Callable[[], Any]] = {
        "base": lambda: base(**x, logits_to_keep=1),
        "single": call("a0"),
        "mixed": call(mixed),
    }
    if theirs is not None:
        fns["peft single"] = lambda: theirs(**x, logits_to_keep=1)
    if (
        method == "lora" and theirs is not None
    ):  # PEFT's mixed-batch path (adapter_names) exists for LoRA: 16 distinct there too
        for i in range(1, N):
            theirs.add_adapter(f"a{i}", peft_cfg)
        names = ["default"] + [f"a{i}" for i in range(1, N)]
        fns["peft mixed"] = lambda: theirs(**x, adapter_names=names, logits_to_keep=1)
    with torch.inference_mode():
        prefill = rounds(fns, repeat)
        merged = None
        if model.method(ours_cfg.method).can_merge():
            model.merge("a0")
            merged_times = rounds(
                {"base": fns["base"], "merged": lambda: model(**x, logits_to_keep=1)}, repeat
            )
            merged = ratio(merged_times, "merged", "base")
            model.unmerge()
        single_step = decode_stepper(lambda **kw: model(**kw, adapters="a0"), N, 32)
        mixed_step = decode_stepper(lambda **kw: model(**kw, adapters=mixed), N, 32)
        decode = rounds({"single": single_step, "mixed": mixed_step}, repeat)
    model.train()

    def train_step(adapters: Any) -> Callable[[], None]:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(**x, adapters=adapters, logits_to_keep=1).logits.float().pow(2).mean().backward()

        return step

    train = rounds({"single": train_step("a0"), "mixed": train_step(mixed)}, max(3, repeat // 2))
    return {
        "method": method,
        "adapter_params": params,
        "unmerged_over_base": ratio(prefill, "single", "base"),
        "merged_over_base": merged,
        "peft_unmerged_over_base": ratio(prefill, "peft single", "base") if theirs is not None else None,
        "prefill_single_ms": med(prefill, "single"),
        "prefill_mixed_over_single": ratio(prefill, "single", "mixed"),  # throughput ratio: >1 = mixed faster
        "peft_prefill_mixed_over_single": ratio(prefill, "peft single", "peft mixed")
        if "peft mixed" in fns
        else None,
        "decode_mixed_over_single": ratio(decode, "single", "mixed"),
        "train_step_single_ms": med(train, "single"),
        "train_mixed_over_single": ratio(train, "single", "mixed"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/bench_methods.json")
    parser.add_argument("--methods", nargs="*", default=None, help="only these methods (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    base = build_base(args.layers)
    chosen = {m: c for m, c in configs().items() if args.methods is None or m in args.methods}
    rows = [time_method(m, ours, theirs, base, args.repeat) for m, (ours, theirs) in chosen.items()]

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    print(
        f"\n### Methods side by side (Llama, SmolLM2-135M shapes, {args.layers} layers, B={N}, T={T}; "
        f"{datetime.date.today()}; `python benchmarks/bench_methods.py --layers {args.layers}`)\n"
    )
    print(
        "| method | params / adapter | unmerged / base | merged / base | PEFT unmerged / base | mixed 16 / single, "
        "prefill (tok/s) | PEFT mixed / single | mixed / single, decode | train step ms | mixed / single, train |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['method']} | {r['adapter_params']:,} | {x(r['unmerged_over_base'])} | {x(r['merged_over_base'])} | "
            f"{x(r['peft_unmerged_over_base'])} | {x(r['prefill_mixed_over_single'])} | "
            f"{x(r['peft_prefill_mixed_over_single'])} | {x(r['decode_mixed_over_single'])} | "
            f"{r['train_step_single_ms']:.0f} | {x(r['train_mixed_over_single'])} |"
        )
    goal = {
        r["method"]: min(r["prefill_mixed_over_single"], r["decode_mixed_over_single"]) >= 0.85 for r in rows
    }
    print(f"\nGoal mixed >= 0.85x single (prefill and decode): {goal}")
    goals = [
        {
            "goal": f"{r['method']}: mixed 16 / single, min of prefill and decode",
            "measured": round(min(r["prefill_mixed_over_single"], r["decode_mixed_over_single"]), 3),
            "target": ">= 0.85",
            "met": goal[r["method"]],
        }
        for r in rows
    ]
    result = {"date": str(datetime.date.today()), "layers": args.layers, "rows": rows, "goal_met": goal}
    result["goals"] = goals
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
