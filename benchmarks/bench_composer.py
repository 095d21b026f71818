"""Composer benchmark: adapters_mtl's Composer vs PEFT, side by side in one run.

Model: a Llama with SmolLM2-135M's shapes (``--layers``, default 30; random fp32 weights), LoRA r=8 on
q_proj+v_proj with random B, the same values in PEFT (helpers shared with bench_routing.py).

Sections:
  1. hot swap: ``Composer.use(name)`` with 1 / 16 / 256 adapters loaded vs PEFT ``set_adapter``
     (PEFT capped at 64 adapters: creating 256 on 30 layers takes minutes);
  2. load one adapter from the registry (``Composer.load``: resolve, verify checksums and base, attach)
     vs PEFT ``load_adapter`` of the same folder;
  3. routed generation: 64 prompts (16 tokens) × 16 new tokens, greedy, each row with its own adapter
     (64 distinct) vs every row with one adapter, and PEFT ``generate(adapter_names=...)`` vs PEFT with
     one active adapter (tokens/s; the composer's ``generate`` minus tokenisation);
  4. merge two adapters, per method, vs PEFT ``add_weighted_adapter`` (ΔW-space methods compared with
     PEFT's ``*_svd`` variants, which also work on ΔW): ms, PEFT/ours, max |ΔW ours − ΔW PEFT| (DARE with
     the same masks on both sides), and the pruned methods also with ``svd_solver="full"`` (LAPACK, the
     slower exact alternative). The goal (≥ 3× PEFT, same ΔW) goes to the JSON's ``goals``.

Timing: one warm-up per variant, then rounds in shuffled order; medians (bench_routing's ``rounds``).
Usage:
  python benchmarks/bench_composer.py [--layers 30] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_routing import (  # noqa: E402  (shared helpers of the routing benchmark)
    _swap_us_counted,
    build_base,
    grow_ours,
    grow_peft,
    make_peft,
    med,
    prefill_inputs,
    ratio,
    rounds,
)

from adapters_mtl import AdapterModel  # noqa: E402
from adapters_mtl.registry import AdapterRegistry  # noqa: E402
from adapters_mtl.serving.composer import Composer  # noqa: E402
from adapters_mtl.serving.merging import MERGE_METHODS, merge_adapters  # noqa: E402

SWAP_COUNTS = (1, 16, 256)
PEFT_SWAP_MAX = 64
GEN_B, GEN_T, GEN_NEW = 64, 16, 16
PEFT_METHOD = {m: m if m in ("cat", "linear", "svd") else f"{m}_svd" for m in MERGE_METHODS}


def section_swap(base: torch.nn.Module, quick: bool) -> list[dict]:
    model = AdapterModel(copy.deepcopy(base)).eval()
    peft_m = None
    rows = []
    for n in SWAP_COUNTS:
        grow_ours(model, n)
        composer = Composer(model, registry=None)
        names = list(model.adapter_names)
        for name in names:  # first use of a name caches its routing; steady state is what we time
            composer.use(name)
        ours_us, _ = _swap_us_counted(composer.use, names, 200 if quick else 2000, budget_s=2)
        row = {"adapters_loaded": n, "composer_use_us": ours_us, "peft_set_adapter_us": None}
        if n <= PEFT_SWAP_MAX:
            if peft_m is None:
                peft_m = make_peft(base, model)
            grow_peft(peft_m, model, n)
            row["peft_set_adapter_us"], _ = _swap_us_counted(
                peft_m.set_adapter, list(peft_m.peft_config), 50, 3
            )
        rows.append(row)
        print(f"  swap with {n} loaded: {row}", flush=True)
    return rows


def section_load(base: torch.nn.Module, tmp: Path, repeat: int) -> dict:
    import peft

    src = AdapterModel(copy.deepcopy(base)).eval()
    grow_ours(src, 1)
    registry = AdapterRegistry(tmp / "reg")
    registry.publish(src, adapter="a0", name="task")
    composer = Composer(AdapterModel(copy.deepcopy(base)).eval(), registry=registry)
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        composer.load("task@1")
        times.append((time.perf_counter() - t0) * 1e3)
        composer.unload("task@1")
    folder = registry.fetch("task@1")
    peft_m = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder), adapter_name="first")
    peft_times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()
        peft_m.load_adapter(str(folder), adapter_name=f"x{i}")
        peft_times.append((time.perf_counter() - t0) * 1e3)
    row = {
        "composer_load_ms": statistics.median(times[1:]),
        "peft_load_adapter_ms": statistics.median(peft_times[1:]),
    }
    print(f"  load: {row}", flush=True)
    return row


def section_generate(base: torch.nn.Module, repeat: int) -> dict:
    model = AdapterModel(copy.deepcopy(base)).eval()
    grow_ours(model, GEN_B)
    composer = Composer(model, registry=None)
    peft_m = make_peft(base, model)
    grow_peft(peft_m, model, GEN_B)
    peft_m.set_adapter("a0")
    x = prefill_inputs(GEN_B, GEN_T)
    distinct = [f"a{i}" for i in range(GEN_B)]
    kw = {"max_new_tokens": GEN_NEW, "min_new_tokens": GEN_NEW, "do_sample": False, "pad_token_id": 0}

    def ours(names: list[str]) -> Callable[[], torch.Tensor]:
        return lambda: composer.model.generate(**x, adapters=composer.resolve(names), **kw)

    fns = {
        "ours_64": ours(distinct),
        "ours_single": ours(["a0"] * GEN_B),
        "peft_64": lambda: peft_m.generate(**x, adapter_names=distinct, **kw),
        "peft_single": lambda: peft_m.generate(**x, **kw),
    }
    with torch.inference_mode():
        times = rounds(fns, repeat)
    tokens = GEN_B * GEN_NEW
    row = {k + "_tok_s": tokens / (med(times, k) / 1e3) for k in fns}
    row["ours_64_vs_single"] = 1 / ratio(times, "ours_64", "ours_single")
    row["ours_64_vs_peft_64"] = 1 / ratio(times, "ours_64", "peft_64")
    print(f"  generate: {row}", flush=True)
    return row


PRUNED = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
MERGE_GOAL = 3.0  # issue 15: pruning merges ≥ 3× faster than PEFT with the same ΔW
SAME_ATOL = 2e-5  # of max|ΔW|: what separates LAPACK's float32 truncation from the float64 one here


@contextlib.contextmanager
def _same_masks() -> Iterator[None]:
    """The i-th ``torch.bernoulli`` call draws from generator seed i, so our DARE and PEFT's get the same
    masks (PEFT's new adapter draws its discarded init from the global RNG first, shifting its stream)."""
    bernoulli, count = torch.bernoulli, [0]

    def counted(p: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return bernoulli(p, generator=torch.Generator().manual_seed(count[0]))

    torch.bernoulli = counted  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.bernoulli = bernoulli


def _max_diff(model: AdapterModel, peft_m: Any, name: str) -> tuple[float, float]:
    """max |ΔW ours − ΔW PEFT| over all modules, and max |ΔW PEFT| (for scale)."""
    diff = scale = 0.0
    for path, (A, B, s) in model.factors(name).items():
        want = peft_m.base_model.model.get_submodule(path).get_delta_weight(name)
        diff = max(diff, (s * (B @ A) - want).abs().max().item())
        scale = max(scale, want.abs().max().item())
    return diff, scale


@torch.no_grad()
def section_merge(base: torch.nn.Module, repeat: int) -> tuple[list[dict], list[dict]]:
    """Per method: ours (and ours with ``svd_solver="full"``, LAPACK as PEFT) vs PEFT, timed in shuffled
    rounds; then one untimed run each with the same DARE masks for max |ΔW ours − ΔW PEFT|."""
    model = AdapterModel(copy.deepcopy(base)).eval()
    grow_ours(model, 2)
    peft_m = make_peft(base, model)
    grow_peft(peft_m, model, 2)
    names, weights, kw = ["a0", "a1"], [0.6, 0.4], {"density": 0.5}

    def ours(method: str, solver: str = "auto") -> Callable[[], None]:
        def run() -> None:
            merge_adapters(model, names, weights, method, into="m", svd_solver=solver, **kw)
            model.remove_adapter("m")

        return run

    def peft(method: str) -> Callable[[], None]:
        def run() -> None:
            peft_m.add_weighted_adapter(names, weights, "m", combination_type=PEFT_METHOD[method], **kw)
            peft_m.delete_adapter("m")

        return run

    rows, goals = [], []
    for method in MERGE_METHODS:
        fns = {"ours": ours(method), "peft": peft(method)}
        if method in PRUNED:
            fns["ours_full"] = ours(method, "full")
        times = rounds(fns, repeat)
        with _same_masks():
            merge_adapters(model, names, weights, method, into="m", **kw)
        with _same_masks():
            peft_m.add_weighted_adapter(names, weights, "m", combination_type=PEFT_METHOD[method], **kw)
        diff, scale = _max_diff(model, peft_m, "m")
        model.remove_adapter("m")
        peft_m.delete_adapter("m")
        row = {
            "method": method,
            "peft_method": PEFT_METHOD[method],
            "ours_ms": med(times, "ours"),
            "ours_full_svd_ms": med(times, "ours_full") if "ours_full" in times else None,
            "peft_ms": med(times, "peft"),
            "peft_over_ours": 1 / ratio(times, "ours", "peft"),
            "max_abs_diff_vs_peft": diff,
            "max_abs_delta_w": scale,
        }
        if method in PRUNED:
            same = diff <= SAME_ATOL * scale
            row["goal_met"] = row["peft_over_ours"] >= MERGE_GOAL and same
            goals.append(
                {
                    "goal": f"{method} merge >= {MERGE_GOAL:g}x faster than PEFT add_weighted_adapter "
                    f"({PEFT_METHOD[method]}), same ΔW (max diff <= {SAME_ATOL:g}·max|ΔW|)",
                    "measured": round(row["peft_over_ours"], 2),
                    "target": MERGE_GOAL,
                    "met": row["goal_met"],
                }
            )
        rows.append(row)
        print(f"  merge {row}", flush=True)
    return rows, goals


def print_swap(rows: list[dict]) -> None:
    print("| adapters loaded | `Composer.use` µs | PEFT `set_adapter` µs |\n|---:|---:|---:|")
    for r in rows:
        peft_us = "-" if r["peft_set_adapter_us"] is None else f"{r['peft_set_adapter_us']:,.0f}"
        print(f"| {r['adapters_loaded']} | {r['composer_use_us']:.1f} | {peft_us} |")


def print_load(ld: dict) -> None:
    print(
        f"\nload from the registry: Composer.load {ld['composer_load_ms']:.1f} ms vs PEFT load_adapter "
        f"{ld['peft_load_adapter_ms']:.1f} ms\n"
    )


def print_generate(g: dict) -> None:
    print(f"| generate B={GEN_B}, {GEN_NEW} new tokens | tokens/s |\n|---|---:|")
    for k, label in (
        ("ours_single", "ours, one adapter"),
        ("ours_64", "ours, 64 distinct adapters"),
        ("peft_single", "PEFT, one adapter"),
        ("peft_64", "PEFT adapter_names, 64 distinct"),
    ):
        print(f"| {label} | {g[k + '_tok_s']:.0f} |")
    print(
        f"\nours 64 distinct / ours single: {g['ours_64_vs_single']:.2f}x; ours / PEFT at 64 distinct: "
        f"{g['ours_64_vs_peft_64']:.2f}x\n"
    )


def print_merge(rows: list[dict]) -> None:
    print(
        "| merge method | ours ms | ours, LAPACK SVD ms | PEFT method | PEFT ms | PEFT/ours "
        "| max abs ΔW ours − PEFT | goal ≥ 3× |\n|---|---:|---:|---|---:|---:|---:|---|"
    )
    for r in rows:
        full = "-" if r.get("ours_full_svd_ms") is None else f"{r['ours_full_svd_ms']:.1f}"
        goal = {True: "met", False: "not met", None: "-"}[r.get("goal_met")]
        speedup = r.get("peft_over_ours", r["peft_ms"] / r["ours_ms"])
        diff = "-" if r.get("max_abs_diff_vs_peft") is None else f"{r['max_abs_diff_vs_peft']:.1e}"
        print(
            f"| {r['method']} | {r['ours_ms']:.1f} | {full} | {r['peft_method']} | {r['peft_ms']:.1f} "
            f"| {speedup:.2f}x | {diff} | {goal} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["swap", "load", "generate", "merge"],
        help="sections to run (default: all); others are kept from the previous JSON",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_composer.json")
    args = parser.parse_args(argv)
    repeat = 2 if args.quick else 5
    base = build_base(args.layers)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.update(
        {
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "layers": args.layers,
            "threads": torch.get_num_threads(),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "swap": lambda: section_swap(base, args.quick),
            "load": lambda: section_load(base, Path(tmp), repeat),
            "generate": lambda: section_generate(base, 2 if args.quick else 3),
        }
        for name in args.sections:
            if name == "merge":
                result["merge"], result["goals"] = section_merge(base, repeat)
            else:
                result[name] = runs[name]()
    print(
        f"\n## Composer vs PEFT (Llama with SmolLM2-135M shapes, {args.layers} layers, LoRA r=8 q+v, CPU)\n"
    )
    if "swap" in result:  # sections never run (a fresh --out) are left out
        print_swap(result["swap"])
    if "load" in result:
        print_load(result["load"])
    if "generate" in result:
        print_generate(result["generate"])
    if "merge" in result:
        print_merge(result["merge"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
