"""Routing benchmark: adapters_mtl vs PEFT, side by side in one run.

Measures on a Llama model with SmolLM2-135M's shapes (random weights, no download):
  1. base forward vs one unmerged LoRA vs merged (prefill B=16, T=128);
  2. mixed batches of N = 1, 4, 16, 64 distinct LoRA adapters vs a single-adapter batch, at prefill
     (B=16, T=128) and decode (B=64, T=1 with a KV cache of 32 tokens), for our two routing
     strategies (gather-and-bmm, group-by-adapter) and PEFT's ``adapter_names`` path;
  3. ``activate()`` latency with 1, 16, 256 adapters loaded vs PEFT ``set_adapter``.
Prints markdown tables and writes JSON. Usage:
  python benchmarks/bench_routing.py [--layers 8] [--quick] [--out benchmarks/results/bench_routing.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adapters_mtl import AdapterModel, LoraConfig

TARGETS = ("q_proj", "v_proj")


def build_base(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def ours_with(base, n: int) -> AdapterModel:
    model = AdapterModel(copy.deepcopy(base)).eval()
    for i in range(n):
        model.add_adapter(f"a{i}", LoraConfig(r=8, alpha=16, targets=TARGETS, init="random"), trainable=False)
    return model


def peft_with(base, n: int):
    import peft

    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg)
    return model.eval()


def prefill_inputs(B: int, T: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(3, 49152, (B, T), generator=g),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
    }


def decode_step(model_call, B: int, past: int = 32) -> Callable[[], object]:
    """A closure running one decode step (T=1) on a KV cache of ``past`` tokens (cropped back each time)."""
    ids = prefill_inputs(B, past)
    out = model_call(**ids, use_cache=True, logits_to_keep=1)  # the base (no adapter) fills the cache
    cache = getattr(out, "cache", None) or out.past_key_values
    nxt = torch.randint(3, 49152, (B, 1))
    mask = torch.ones(B, past + 1, dtype=torch.long)

    def step(**extra):
        extra_tokens = cache.get_seq_length() - past
        if extra_tokens:
            cache.crop(-extra_tokens)  # drop the previous step's token: every step sees `past` tokens
        return model_call(
            input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **extra
        )

    return step


def paired_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median ms of each closure, timed round-robin so drift of the machine hits all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def section_merge(base, repeat: int) -> list[dict]:
    x = prefill_inputs(16, 128)
    ours = ours_with(base, 1)
    peft_m = peft_with(base, 1)
    ours.activate("a0")
    calls = {
        "base": lambda: base(**x, logits_to_keep=1),
        "ours": lambda: ours(**x, logits_to_keep=1),
        "peft": lambda: peft_m(**x, logits_to_keep=1),
    }
    with torch.inference_mode():
        unmerged = paired_ms(calls, repeat)
        ours.merge("a0")
        peft_m.merge_adapter()
        merged = paired_ms(calls, repeat)
        ours.unmerge()
        peft_m.unmerge_adapter()
    rows = []
    for lib in ("ours", "peft"):
        rows.append(
            {
                "library": "adapters_mtl" if lib == "ours" else "peft",
                "base_ms": unmerged["base"],
                "unmerged_ms": unmerged[lib],
                "merged_ms": merged[lib],
                "unmerged_ratio": unmerged[lib] / unmerged["base"],
                "merged_ratio": merged[lib] / merged["base"],
            }
        )
    return rows


def section_mixed(base, counts: list[int], repeat: int) -> list[dict]:
    rows = []
    ours = ours_with(base, max(counts))
    peft_m = peft_with(base, max(counts))
    peft_m.set_adapter("a0")
    shapes = {"prefill B=16 T=128": (16, 128), "decode B=64 T=1 (cache 32)": (64, 1)}
    with torch.inference_mode():
        for shape, (B, T) in shapes.items():
            tokens = B * T
            if T == 1:
                ours_step, peft_step = decode_step(ours, B), decode_step(peft_m, B)

                def run_ours(adapters, step=ours_step):
                    return step(adapters=adapters)

                def run_peft(adapter_names, step=peft_step):
                    return step() if adapter_names is None else step(adapter_names=adapter_names)
            else:
                x = prefill_inputs(B, T)

                def run_ours(adapters, x=x):
                    return ours(**x, adapters=adapters, logits_to_keep=1)

                def run_peft(adapter_names, x=x):
                    if adapter_names is None:
                        return peft_m(**x, logits_to_keep=1)
                    return peft_m(**x, adapter_names=adapter_names, logits_to_keep=1)

            reps = repeat if T > 1 else 4 * repeat  # decode steps are short: more samples
            for n in counts:
                # N <= B: rows cycle through the N adapters; N > B: B distinct of the N loaded
                names = [f"a{i % n}" for i in range(B)] if n <= B else [f"a{(i * n) // B}" for i in range(B)]

                def strategy(name, names=names, run=run_ours):
                    ours._route.strategy = name
                    return run(names)

                ms = paired_ms(
                    {
                        "single_ours": lambda run=run_ours: run("a0"),
                        "gather": lambda: strategy("gather"),
                        "group": lambda: strategy("group"),
                        "single_peft": lambda run=run_peft: run(None),
                        "peft": lambda run=run_peft, names=names: run(names),
                    },
                    reps,
                )
                ours._route.strategy = "gather"
                row = {"shape": shape, "adapters": n, "distinct_in_batch": len(set(names))}
                for key in ("single_ours", "gather", "group", "single_peft", "peft"):
                    row[f"{key}_tok_s"] = tokens / ms[key] * 1e3
                for key in ("gather", "group"):
                    row[f"{key}_vs_single"] = ms["single_ours"] / ms[key]
                row["peft_vs_single"] = ms["single_peft"] / ms["peft"]
                row["gather_vs_peft"] = ms["peft"] / ms["gather"]
                rows.append(row)
                print(
                    f"  {shape} N={n}: gather {row['gather_vs_single']:.2f}x single, "
                    f"group {row['group_vs_single']:.2f}x, peft {row['peft_vs_single']:.2f}x, "
                    f"ours/peft {row['gather_vs_peft']:.2f}x",
                    flush=True,
                )
    return rows


def section_activate(base, counts: list[int], peft_max: int) -> list[dict]:
    rows = []
    for n in counts:
        ours = ours_with(base, n)
        names = [f"a{i}" for i in range(n)]
        for name in names:
            ours.activate(name)  # first activation of a name caches its selection
        us = _swap_us(ours.activate, names)
        row = {"adapters_loaded": n, "ours_activate_us": us, "peft_set_adapter_us": None}
        if n <= peft_max:
            peft_m = peft_with(base, n)
            row["peft_set_adapter_us"] = _swap_us(peft_m.set_adapter, names)
        rows.append(row)
        print(f"  activate with {n} loaded: ours {us:.1f} us, peft {row['peft_set_adapter_us']}", flush=True)
    return rows


def _swap_us(swap: Callable[[str], object], names: list[str], calls: int = 400) -> float:
    times = []
    for i in range(calls):
        name = names[(i * 7919) % len(names)]
        t0 = time.perf_counter()
        swap(name)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_tables(result: dict) -> None:
    print("\n### Base vs unmerged vs merged LoRA (prefill B=16, T=128; r=8 on q_proj+v_proj)\n")
    print("| library | base ms | unmerged ms | merged ms | unmerged / base | merged / base |")
    print("|---|---|---|---|---|---|")
    for r in result["merge"]:
        print(
            f"| {r['library']} | {r['base_ms']:.1f} | {r['unmerged_ms']:.1f} | {r['merged_ms']:.1f} | "
            f"{r['unmerged_ratio']:.3f}x | {r['merged_ratio']:.3f}x |"
        )
    print("\n### Mixed batches: throughput relative to a single-adapter batch\n")
    print(
        "| shape | adapters loaded (distinct in batch) | ours gather | ours group | PEFT adapter_names | ours gather tok/s | PEFT tok/s | ours / PEFT |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in result["mixed"]:
        print(
            f"| {r['shape']} | {r['adapters']} ({r['distinct_in_batch']}) | {r['gather_vs_single']:.2f}x | "
            f"{r['group_vs_single']:.2f}x | {r['peft_vs_single']:.2f}x | {r['gather_tok_s']:.0f} | "
            f"{r['peft_tok_s']:.0f} | {r['gather_vs_peft']:.2f}x |"
        )
    print("\n### Hot swap latency (median)\n")
    print("| adapters loaded | ours activate() µs | PEFT set_adapter() µs |")
    print("|---|---|---|")
    for r in result["activate"]:
        p = f"{r['peft_set_adapter_us']:.1f}" if r["peft_set_adapter_us"] is not None else "not run"
        print(f"| {r['adapters_loaded']} | {r['ours_activate_us']:.1f} | {p} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layers", type=int, default=8, help="decoder layers (SmolLM2 has 30; default 8 to fit 2 CPU cores)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 layers, fewer repeats and adapter counts (smoke run)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_routing.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    layers = 2 if args.quick else args.layers
    repeat = 2 if args.quick else args.repeat
    base = build_base(layers)
    t0 = time.perf_counter()
    print("section 1: base / unmerged / merged", flush=True)
    merge_rows = section_merge(base, repeat)
    print("section 2: mixed batches", flush=True)
    mixed_rows = section_mixed(base, [1, 4] if args.quick else [1, 4, 16, 64], repeat)
    print("section 3: activate", flush=True)
    act_rows = section_activate(
        base, [1, 16] if args.quick else [1, 16, 256], peft_max=16 if args.quick else 256
    )
    result = {
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": cpu_model(),
            "date": datetime.date.today().isoformat(),
            "layers": layers,
            "repeat": repeat,
        },
        "merge": merge_rows,
        "mixed": mixed_rows,
        "activate": act_rows,
        "seconds": time.perf_counter() - t0,
    }
    print_tables(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
