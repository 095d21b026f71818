"""GPU decode benchmark: mixed batches of many LoRA adapters, bf16, adapters_mtl vs PEFT in one run.

Decode steps (B=64 rows, T=1, on a 32-token KV cache) of a Llama with SmolLM2-135M's shapes and of a
1B-class shape (Llama-3.2-1B's: hidden 2048, 16 layers, 32/8 heads, intermediate 8192), random bf16
weights (no download), LoRA r=16 on q_proj+v_proj. Rows use 1, 16, 64 distinct adapters with 1, 16, 64
or 256 loaded (with 256, the 64 rows use 64 distinct ones spread over all). Variants: ours ``gather``
(each row's A/B gathered, two ``bmm``) and ``segment`` (rows sorted by adapter, ``torch._grouped_mm`` over
the distinct adapters' weights: no per-row weight copies), and PEFT's ``adapter_names=`` on a copy of
the same base (PEFT capped at 64 adapters: adding 256 takes minutes). Goal: ours at 64 distinct adapters
≥ 0.85× the single-adapter throughput.

Without CUDA it prints that it skipped and writes a JSON saying so (``make bench`` on a CPU machine);
``--device cpu --dtype float32 --layers 2 --quick`` runs the same code on the CPU to check it.

Usage:
  python benchmarks/bench_gpu.py [--quick] [--device cuda] [--dtype bfloat16] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_routing import copy_into_peft, med, ratio, rounds, row_names  # noqa: E402

from adapters_mtl import AdapterModel, LoraConfig  # noqa: E402

B, PAST, RANK = 64, 32, 16
LOADED = (1, 16, 64, 256)
PEFT_MAX = 64
GOAL = 0.85
SHAPES = {
    "SmolLM2-135M": {"hidden_size": 576, "intermediate_size": 1536, "heads": 9, "kv": 3, "layers": 30},
    "Llama-3.2-1B": {"hidden_size": 2048, "intermediate_size": 8192, "heads": 32, "kv": 8, "layers": 16},
}
VOCAB = {"SmolLM2-135M": 49152, "Llama-3.2-1B": 128256}


def build(shape: str, layers: int | None, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[shape]
    cfg = LlamaConfig(
        vocab_size=VOCAB[shape],
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=layers or s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def stepper(call: Any, vocab: int, device: str) -> Any:
    """One decode step of ``call`` on a KV cache of exactly PAST tokens (cropped back after each step)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (B, PAST), generator=g).to(device)
    out = call(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    token = torch.randint(3, vocab, (B, 1), generator=g).to(device)
    mask = torch.ones(B, PAST + 1, dtype=torch.long, device=device)

    def step(**extra: Any) -> Any:
        grown = cache.get_seq_length() - PAST
        if grown:
            cache.crop(-grown)
        result = call(
            input_ids=token, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **extra
        )
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    return step


def section(shape: str, args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    import peft

    base = build(shape, args.layers, args.device, dtype)
    vocab = base.config.vocab_size
    ours = AdapterModel(copy.deepcopy(base)).eval()
    targets = ("q_proj", "v_proj")
    peft_cfg = peft.LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=list(targets), init_lora_weights=False
    )
    peft_m = None
    rows: list[dict] = []
    repeat = 3 if args.quick else 20
    with torch.inference_mode():
        for loaded in LOADED:
            for i in range(len(ours.adapter_names), loaded):
                ours.add_adapter(f"a{i}", LoraConfig(r=RANK, alpha=2 * RANK, targets=targets, init="random"))
            ours.eval()
            run_ours = stepper(ours, vocab, args.device)
            fns: dict[str, Any] = {"single": lambda run_ours=run_ours: run_ours(adapters="a0")}
            names = row_names(min(loaded, B), B) if loaded <= B else row_names(loaded, B)
            if loaded > 1:
                for strategy in ("gather", "segment"):

                    def fn(
                        strategy: str = strategy, run_ours: Any = run_ours, names: list[str] = names
                    ) -> Any:
                        ours.routing_strategy = strategy
                        return run_ours(adapters=names)

                    fns[strategy] = fn
            if loaded <= PEFT_MAX:
                if peft_m is None:
                    peft_m = peft.get_peft_model(copy.deepcopy(base), peft_cfg, adapter_name="a0")
                    copy_into_peft(peft_m, ours, "a0")
                for i in range(len(peft_m.peft_config), loaded):
                    peft_m.add_adapter(f"a{i}", peft_cfg)
                    copy_into_peft(peft_m, ours, f"a{i}")
                peft_m.eval()
                run_peft = stepper(peft_m, vocab, args.device)
                fns["peft"] = lambda run_peft=run_peft, names=names: run_peft(adapter_names=names)
            elif peft_m is not None:
                del peft_m
                peft_m = None
            times = rounds(fns, repeat)
            ours.routing_strategy = "gather"
            row: dict[str, Any] = {
                "shape": shape,
                "adapters_loaded": loaded,
                "distinct_in_batch": len(set(names)),
                "single_tok_s": B / med(times, "single") * 1e3,
            }
            for key in ("gather", "segment", "peft"):
                if key in times:
                    row[f"{key}_tok_s"] = B / med(times, key) * 1e3
                    row[f"{key}_vs_single"] = ratio(times, "single", key)
            if "peft" in times:
                for key in ("gather", "segment"):
                    if key in times:
                        row[f"{key}_vs_peft"] = ratio(times, "peft", key)
            rows.append(row)
            print(
                f"  {shape} loaded={loaded}: "
                + ", ".join(f"{k}={v:.2f}" for k, v in row.items() if "vs" in k)
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--layers", type=int, default=None, help="override every shape's layer count")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_gpu.json")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"date": datetime.date.today().isoformat(), "torch": torch.__version__}
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: skipped (no CUDA device on this machine)")
        result["skipped"] = "no CUDA device"
        result["goals"] = [
            {
                "goal": f"GPU decode B={B}, 64 distinct adapters / single",
                "measured": None,
                "target": f">= {GOAL}",
                "met": None,
            }
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        return
    dtype = getattr(torch, args.dtype)
    result["device"] = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({args.dtype})"
    rows = [r for shape in SHAPES for r in section(shape, args, dtype)]
    result["rows"] = rows
    print(
        f"\n## GPU decode B={B} (cache {PAST}), LoRA r={RANK} q+v, {result['device']}, {args.dtype}, {result['date']}\n"
    )
    print(
        "| shape | loaded (distinct) | single tok/s | gather / single | segment / single | PEFT / single | gather / PEFT | segment / PEFT |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")

    def cell(r: dict, k: str) -> str:
        return f"{r[k]:.2f}×" if k in r else "–"

    for r in rows:
        print(
            f"| {r['shape']} | {r['adapters_loaded']} ({r['distinct_in_batch']}) | {r['single_tok_s']:.0f} | "
            f"{cell(r, 'gather_vs_single')} | {cell(r, 'segment_vs_single')} | {cell(r, 'peft_vs_single')} | "
            f"{cell(r, 'gather_vs_peft')} | {cell(r, 'segment_vs_peft')} |"
        )
    goals = []
    for r in rows:
        if r["adapters_loaded"] == 64:
            best = max(r.get("gather_vs_single", 0.0), r.get("segment_vs_single", 0.0))
            goals.append(
                {
                    "goal": f"GPU decode {r['shape']} B={B}, 64 distinct adapters / single (best strategy)",
                    "measured": round(best, 3),
                    "target": f">= {GOAL}",
                    "met": best >= GOAL,
                }
            )
    result["goals"] = goals
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
