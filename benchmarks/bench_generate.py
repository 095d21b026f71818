"""Routed generation benchmark: ``generate`` with 1, 16 and 64 distinct adapters, ours and PEFT's.

Model: a Llama with SmolLM2-135M's shapes (random fp32 weights, no download; ``--layers``, default 30), as
in bench_routing.py. 64 LoRA adapters (r=8, alpha=16 on q_proj+v_proj) are loaded; PEFT runs on a deep
copy of the same base holding the SAME LoRA values (copied from ours), through its
``generate(adapter_names=...)``.

Each variant is one greedy ``generate`` of B=64 prompts (32 tokens each, 32 new tokens, KV cache) whose
rows use 1 (every row the same adapter: each library's single-adapter path), 16 or 64 distinct adapters.
A streamer stamps the time of every generated token, so one call gives:
  * time to first token (TTFT): from the call to the first token (prefill + choosing token 1);
  * decode tokens/s: the 31 tokens after the first, B rows each, over the time they took;
  * total: the whole call (end-to-end tokens/s = B x 32 / total).
With ``--prefix``, prefix-tuning rows (ours only: PEFT's prefix tuning cannot give rows different
prefixes) run 64 prefix adapters of 16 virtual tokens on another copy of the base, single vs 64 distinct
(off by default: two more generates per round, ~25 % more time).

Checks (every timed call's tokens are kept): the greedy tokens of ours and PEFT are identical for every
row at N = 1, 16, 64; a few rows of ours' N=64 batch equal that row generated alone with its adapter; and
the adapters change the tokens (rows that differ from the bare base).

Timing as in bench_routing.py: a short warm-up call per variant, then rounds in which every variant runs
once in a shuffled order; ms are medians over rounds, ratios are medians of per-round ratios (paired).
By default 2 to 5 rounds, as many as fit ~3 minutes (the whole run: ~4 minutes on 2 quiet cores).
``--profile`` prints torch.profiler's top operators of one generate with 64 distinct adapters and with
one adapter instead of timing.

Usage:
  python benchmarks/bench_generate.py [--quick] [--layers 30] [--rounds N] [--prefix] [--profile] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_routing import (  # noqa: E402
    VOCAB,
    Stages,
    build_base,
    cpu_model,
    grow_ours,
    grow_peft,
    make_peft,
    row_names,
)

from adapters_mtl import AdapterModel, PrefixConfig  # noqa: E402

B, PROMPT, NEW = 64, 32, 32
COUNTS = (1, 16, 64)
LOADED = max(COUNTS)
PREFIX_TOKENS = 16
ALONE_ROWS = (0, 21, 42, 63)  # rows of the N=64 batch also generated alone with their adapter
BASE_ROWS = 8  # rows also generated with the bare base (the adapters must change their tokens)
GOAL_MIXED = 0.9

Gen = Callable[..., torch.Tensor]  # (streamer, new tokens, rows) -> generated tokens (rows, new)


@dataclass(frozen=True)
class Plan:
    """How many timed rounds (every variant once each): at least ``min_rounds``, then more while they fit
    in ``budget_s`` (the default fits ~5 minutes in all on 2 cores at 30 layers)."""

    min_rounds: int
    max_rounds: int
    budget_s: float


def make_plan(quick: bool, rounds: int | None) -> Plan:
    if rounds is not None:
        return Plan(rounds, rounds, float("inf"))
    return Plan(1, 1, 0.0) if quick else Plan(2, 5, 170.0)


class Clock:
    """A ``generate`` streamer that only stamps times: ``put`` gets the prompt first, then each new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, _value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        self.stamps.append(time.perf_counter())


def prompts(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, VOCAB, (B, PROMPT), generator=g),
        "attention_mask": torch.ones(B, PROMPT, dtype=torch.long),
    }


def gen_kwargs(new: int = NEW) -> dict[str, Any]:
    # eos None: every row generates exactly ``new`` tokens (a random model may hit EOS anywhere)
    return {
        "max_new_tokens": new,
        "do_sample": False,
        "use_cache": True,
        "eos_token_id": None,
        "pad_token_id": 0,
    }


def variants(ours: AdapterModel, peft_m: Any, prefix: AdapterModel | None) -> dict[str, Gen]:
    """Every timed generate: ``ours:N``, ``peft:N`` (N distinct adapters over the B rows) and prefix ones.

    Each is called as ``fn(streamer, new_tokens, rows)``: the first ``rows`` prompts (and their adapters).
    """
    x = prompts()
    peft_m.set_adapter("a0")

    def ours_gen(model: AdapterModel, names: list[str]) -> Gen:
        def gen(streamer: Any, new: int = NEW, rows: int = B) -> torch.Tensor:
            # one name for all rows: the single-adapter path (adapters="a0"), else one per row
            adapters = names[0] if len(set(names)) == 1 else names[:rows]
            part = {k: v[:rows] for k, v in x.items()}
            return model.generate(**part, adapters=adapters, streamer=streamer, **gen_kwargs(new))[:, PROMPT:]

        return gen

    def peft_gen(names: list[str]) -> Gen:
        def gen(streamer: Any, new: int = NEW, rows: int = B) -> torch.Tensor:
            # one name for all rows: PEFT's active adapter (a0), its plain LoRA path
            extra = {} if len(set(names)) == 1 else {"adapter_names": names[:rows]}
            part = {k: v[:rows] for k, v in x.items()}
            return peft_m.generate(**part, **extra, streamer=streamer, **gen_kwargs(new))[:, PROMPT:]

        return gen

    fns: dict[str, Gen] = {}
    for n in COUNTS:
        fns[f"ours:{n}"] = ours_gen(ours, row_names(n, B))
        fns[f"peft:{n}"] = peft_gen(row_names(n, B))
    if prefix is not None:
        fns["prefix:1"] = ours_gen(prefix, ["p0"] * B)
        fns["prefix:64"] = ours_gen(prefix, [f"p{i}" for i in range(B)])
    return fns


def timed_rounds(fns: dict[str, Gen], plan: Plan) -> tuple[dict, dict]:
    """Per variant and round: TTFT, decode and total seconds; and each variant's generated tokens.

    At least ``plan.min_rounds`` rounds; more (up to ``plan.max_rounds``) while the next round is expected
    to end within ``plan.budget_s`` of the first.
    """
    order = list(fns)
    tokens: dict[str, torch.Tensor] = {}
    for key in order:
        fns[key](None, 2, 8)  # warm-up on 8 rows: first-call allocations, routing caches
    times: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "decode": [], "total": []} for k in order}
    rng = random.Random(0)
    start = time.perf_counter()
    for done in range(plan.max_rounds):
        elapsed = time.perf_counter() - start
        if done >= plan.min_rounds and elapsed * (done + 1) / done > plan.budget_s:
            break
        rng.shuffle(order)
        for key in order:
            clock = Clock()
            t0 = time.perf_counter()
            out = fns[key](clock)
            end = time.perf_counter()
            # stamps: prompt, token 1, ..., token NEW, end()
            assert len(clock.stamps) == NEW + 2, f"{key}: {len(clock.stamps)} streamer stamps"
            times[key]["ttft"].append(clock.stamps[1] - t0)
            times[key]["decode"].append(clock.stamps[NEW] - clock.stamps[1])
            times[key]["total"].append(end - t0)
            tokens[key] = out
        print(f"  round {done + 1}: {time.perf_counter() - start:.0f} s", flush=True)
    return times, tokens


def paired(times: dict, num: str, den: str, what: str) -> float:
    """Median over rounds of times[num][what] / times[den][what]."""
    return statistics.median(a / b for a, b in zip(times[num][what], times[den][what], strict=True))


def med(times: dict, key: str, what: str) -> float:
    return statistics.median(times[key][what])


def table_rows(times: dict) -> list[dict]:
    decode_tokens = B * (NEW - 1)
    rows = []
    for lib in ("ours", "peft", "prefix"):
        single = f"{lib}:1"
        for n in COUNTS:
            key = f"{lib}:{n}"
            if key not in times:
                continue
            row = {
                "library": {
                    "ours": "adapters_mtl LoRA",
                    "peft": "PEFT LoRA",
                    "prefix": "adapters_mtl prefix",
                }[lib],
                "distinct_adapters": n,
                "ttft_ms": med(times, key, "ttft") * 1e3,
                "decode_tok_s": decode_tokens / med(times, key, "decode"),
                "total_ms": med(times, key, "total") * 1e3,
                "total_tok_s": B * NEW / med(times, key, "total"),
                # throughput ratios = inverse time ratios, paired per round
                "decode_vs_single": paired(times, single, key, "decode"),
                "total_vs_single": paired(times, single, key, "total"),
                "ttft_vs_single": paired(times, key, single, "ttft"),  # a time ratio: > 1 is slower
                "decode_ours_vs_peft": None,
                "total_ours_vs_peft": None,
                "ttft_ours_vs_peft": None,
            }
            if lib == "ours":
                row["decode_ours_vs_peft"] = paired(times, f"peft:{n}", key, "decode")
                row["total_ours_vs_peft"] = paired(times, f"peft:{n}", key, "total")
                row["ttft_ours_vs_peft"] = paired(times, key, f"peft:{n}", "ttft")
            rows.append(row)
    return rows


@torch.inference_mode()
def checks(ours: AdapterModel, tokens: dict[str, torch.Tensor], prefix: AdapterModel | None) -> dict:
    """Greedy-token parity: ours vs PEFT per row, mixed rows vs each alone, and the adapters' effect."""
    x = prompts()
    out: dict[str, Any] = {}
    for n in COUNTS:
        same = (tokens[f"ours:{n}"] == tokens[f"peft:{n}"]).all(dim=1)
        out[f"rows_equal_peft_N{n}"] = int(same.sum())
    # the bare base on the first BASE_ROWS rows (both models hold the same base values)
    first = {k: v[:BASE_ROWS] for k, v in x.items()}
    base = ours.generate(**first, adapters=None, **gen_kwargs())[:, PROMPT:]
    out["base_rows_checked"] = BASE_ROWS
    out["rows_differing_from_base_N64"] = int((tokens["ours:64"][:BASE_ROWS] != base).any(dim=1).sum())

    def alone(model: AdapterModel, mixed: torch.Tensor, name: str) -> int:
        ok = 0
        for i in ALONE_ROWS:
            one = {k: v[i : i + 1] for k, v in x.items()}
            got = model.generate(**one, adapters=f"{name}{i}", **gen_kwargs())[0, PROMPT:]
            ok += bool((got == mixed[i]).all())
        return ok

    out["alone_rows_checked"] = len(ALONE_ROWS)
    out["rows_equal_alone_N64"] = alone(ours, tokens["ours:64"], "a")
    if prefix is not None:
        out["prefix_rows_equal_alone_N64"] = alone(prefix, tokens["prefix:64"], "p")
        differ = (tokens["prefix:64"][:BASE_ROWS] != base).any(dim=1)
        out["prefix_rows_differing_from_base_N64"] = int(differ.sum())
    return out


def goals(rows: list[dict], check: dict, has_prefix: bool) -> list[dict]:
    ours64 = next(r for r in rows if r["library"] == "adapters_mtl LoRA" and r["distinct_adapters"] == LOADED)
    found = [
        (f"generate B={B}: {LOADED} distinct LoRA adapters / one, decode tok/s", ours64["decode_vs_single"]),
        (
            f"generate B={B}: {LOADED} distinct LoRA adapters / one, end-to-end tok/s",
            ours64["total_vs_single"],
        ),
    ]
    if has_prefix:
        p64 = next(
            r for r in rows if r["library"] == "adapters_mtl prefix" and r["distinct_adapters"] == LOADED
        )
        found.append(
            (
                f"generate B={B}: {LOADED} distinct prefix adapters / one, decode tok/s",
                p64["decode_vs_single"],
            )
        )
    out = [
        {"goal": g, "measured": round(v, 3), "target": f">= {GOAL_MIXED}", "met": bool(v >= GOAL_MIXED)}
        for g, v in found
    ]
    equal = sum(check[f"rows_equal_peft_N{n}"] for n in COUNTS)
    out.append(
        {
            "goal": "generate: greedy tokens ours == PEFT (rows, N = 1, 16, 64)",
            "measured": f"{equal}/{B * len(COUNTS)}",
            "target": f"{B * len(COUNTS)}/{B * len(COUNTS)}",
            "met": equal == B * len(COUNTS),
        }
    )
    alone_ok = check["rows_equal_alone_N64"] + check.get("prefix_rows_equal_alone_N64", 0)
    alone_n = check["alone_rows_checked"] * (2 if has_prefix else 1)
    out.append(
        {
            "goal": "generate: mixed-batch rows == the row alone with its adapter",
            "measured": f"{alone_ok}/{alone_n}",
            "target": f"{alone_n}/{alone_n}",
            "met": alone_ok == alone_n,
        }
    )
    return out


def print_tables(result: dict) -> None:
    m = result["machine"]
    print(
        f"\nLlama with SmolLM2-135M shapes, {m['layers']} layers, random fp32 weights; LoRA r=8 alpha=16 on "
        f"q_proj+v_proj; B={B}, prompt {PROMPT}, {NEW} new tokens, greedy, KV cache; {m['adapters_loaded']} "
        f"adapters loaded; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"{m['threads']} threads on {m['cpu']}; {m['rounds']} rounds; {m['date']}\n"
    )
    if m["busy_warning"]:
        print(
            f"WARNING: other processes used up to {max(m['others_cpu_share_per_stage'].values()):.0%} of the CPU "
            "during a stage: timings are inflated and noisy; rerun when the machine is quiet.\n"
        )
    print(
        "| library | distinct adapters in batch | TTFT ms | decode tok/s | total ms | end-to-end tok/s "
        "| decode / single | end-to-end / single | TTFT / single | ours / PEFT decode | ours / PEFT end-to-end "
        "| ours / PEFT TTFT |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def x(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}×"

    for r in result["rows"]:
        print(
            f"| {r['library']} | {r['distinct_adapters']} | {r['ttft_ms']:.0f} | {r['decode_tok_s']:.0f} | "
            f"{r['total_ms']:.0f} | {r['total_tok_s']:.0f} | {x(r['decode_vs_single'])} | "
            f"{x(r['total_vs_single'])} | {x(r['ttft_vs_single'])} | {x(r['decode_ours_vs_peft'])} | "
            f"{x(r['total_ours_vs_peft'])} | {x(r['ttft_ours_vs_peft'])} |"
        )
    print(
        "\nThroughput ratios (decode, end-to-end) > 1 are faster; TTFT ratios are time ratios (> 1 is slower; "
        "ours / PEFT TTFT < 1: ours first). N=1: every row uses one adapter, each library's single-adapter "
        "path. All ratios are medians of per-round ratios."
    )
    c = result["checks"]
    print(
        f"\nGreedy tokens: ours == PEFT on {c['rows_equal_peft_N1']}/{B}, {c['rows_equal_peft_N16']}/{B}, "
        f"{c['rows_equal_peft_N64']}/{B} rows (N = 1, 16, 64); N=64 rows == alone: {c['rows_equal_alone_N64']}/"
        f"{c['alone_rows_checked']}; rows whose tokens differ from the bare base: "
        f"{c['rows_differing_from_base_N64']}/{c['base_rows_checked']}"
        + (
            f"; prefix N=64 rows == alone: {c['prefix_rows_equal_alone_N64']}/{c['alone_rows_checked']}, "
            f"differ from base: {c['prefix_rows_differing_from_base_N64']}/{c['base_rows_checked']}"
            if "prefix_rows_equal_alone_N64" in c
            else ""
        )
    )
    print("\n| goal | measured | target | met |\n|---|---|---|---|")
    for g in result["goals"]:
        print(f"| {g['goal']} | {g['measured']} | {g['target']} | {'yes' if g['met'] else 'NO'} |")


@torch.inference_mode()
def profile(ours: AdapterModel, rows: int) -> None:
    """torch.profiler's top operators (self CPU time) of one generate, 64 distinct adapters vs one."""
    from torch.profiler import ProfilerActivity, profile

    x = prompts()
    for label, adapters in (("one adapter", "a0"), (f"{LOADED} distinct", row_names(LOADED, B))):
        ours.generate(**x, adapters=adapters, **gen_kwargs(2))  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            ours.generate(**x, adapters=adapters, **gen_kwargs())
            wall = time.perf_counter() - t0
        print(f"\n### generate with {label}: {wall * 1e3:.0f} ms wall\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 layers, 1 round (~1 min)")
    parser.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default 30, or 4 with --quick)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds (default: 2 to 5, as many as fit ~3 minutes; 1 with --quick)",
    )
    parser.add_argument("--prefix", action="store_true", help="add the prefix-tuning rows (~25 %% more time)")
    parser.add_argument(
        "--profile", action="store_true", help="profile one generate (64 distinct vs one) instead"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "bench_generate.json",
        help="JSON output",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)  # fixed: comparable runs on the shared 2-core machine, as bench_routing
    layers = args.layers or (4 if args.quick else 30)
    plan = make_plan(args.quick, args.rounds)
    t_start = time.perf_counter()
    stage = Stages()
    with stage(f"build models ({layers} layers, {LOADED} LoRA adapters in both libraries)"):
        base = build_base(layers)
        ours = AdapterModel(copy.deepcopy(base)).eval()
        grow_ours(ours, LOADED)
        if args.profile:
            profile(ours, rows=25)
            return
        peft_m = make_peft(base, ours)
        grow_peft(peft_m, ours, LOADED)
        prefix: AdapterModel | None = None
        if args.prefix:
            prefix = AdapterModel(base).eval()  # the last copy: the base itself
            for i in range(LOADED):
                prefix.add_adapter(f"p{i}", PrefixConfig(num_virtual_tokens=PREFIX_TOKENS), trainable=False)
        del base
    with stage(f"timing: rounds of every variant ({asdict(plan)})"), torch.inference_mode():
        times, tokens = timed_rounds(variants(ours, peft_m, prefix), plan)
    with stage("checks: ours vs PEFT tokens, mixed rows vs alone"):
        check = checks(ours, tokens, prefix)
    rows = table_rows(times)
    import peft
    import transformers

    result: dict[str, Any] = {
        "machine": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "layers": layers,
            "rounds": len(times["ours:1"]["total"]),
            "plan": asdict(plan),
            "adapters_loaded": LOADED,
            "prefix_rows": prefix is not None,
            # other processes on a shared CPU inflate the ms and add noise (less to the paired ratios)
            "others_cpu_share_per_stage": stage.others_cpu,
            "busy_warning": max(stage.others_cpu.values()) > 0.10,
        },
        "rows": rows,
        "checks": check,
        "goals": goals(rows, check, prefix is not None),
        "stage_seconds": stage.seconds,
        "raw_seconds_per_round": times,
    }
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print_tables(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s; stages: {stage.seconds})")


if __name__ == "__main__":
    main()
