"""Routing benchmark: adapters_mtl vs PEFT, side by side in one run.

Model: a Llama with SmolLM2-135M's shapes (hidden 576, 9 heads / 3 KV heads, intermediate 1536, vocab
49152; random fp32 weights, no download; ``--layers``, default 30) or, with ``--real``, the packaged
SmolLM2-135M. Every LoRA is r=8, alpha=16 on q_proj+v_proj. PEFT runs on a deep copy of the same base
with the SAME LoRA values (copied from ours), and a parity check confirms both compute the same logits.

Sections:
  1. base forward vs one unmerged LoRA vs merged (prefill B=16, T=128);
  2. mixed batches of N = 1, 4, 16, 64 distinct adapters vs a single-adapter batch, at prefill
     (B=16, T=128; for N=64 the 16 rows use 16 distinct of the 64 loaded) and at decode (B=64, T=1 on a
     32-token KV cache), for our three strategies (``gather``, ``group``, ``segment``) and PEFT's
     ``adapter_names=``;
  3. ``activate()`` latency with 1, 16, 64, 256 adapters loaded vs PEFT ``set_adapter`` (PEFT capped at
     64 adapters: creating 256 PEFT adapters on 30 layers alone takes minutes).

Timing: ``torch.inference_mode()``, one warm-up call per variant, then rounds in which every variant
runs once in a shuffled order; ms are medians over rounds, ratios are medians of per-round ratios
(paired), so machine drift (other processes on a shared CPU) cancels out of the ratios.

Usage:
  python benchmarks/bench_routing.py [--quick] [--layers 30] [--real] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_mtl import AdapterModel, LoraConfig
from adapters_mtl.files.folder import to_peft_state_dict

TARGETS = ("q_proj", "v_proj")
RANK, ALPHA = 8, 16
VOCAB = 49152
PREFILL_B, PREFILL_T = 16, 128
DECODE_B, DECODE_PAST = 64, 32
MIXED_COUNTS = (1, 4, 16, 64)
ACTIVATE_COUNTS = (1, 16, 64, 256)
PEFT_ACTIVATE_MAX = 64  # PEFT add_adapter walks the whole model: ~0.3 s per adapter at 64 on 30 layers
# issue 15's goals (mixed >= 0.9x single at prefill and decode, >= 2.5x PEFT's adapter_names at decode,
# single-adapter forward no slower than PEFT's)
GOALS = {
    "unmerged": 1.08,
    "merged": 1.01,
    "unmerged_vs_peft": 1.00,
    "mixed_vs_single": 0.9,
    "vs_peft_decode": 2.5,
    "activate_us": 100,
}
STRATEGIES = ("gather", "group", "segment")  # AdapterModel.routing_strategy; gather is the default

Fn = Callable[[], object]
RAW: dict[str, dict[str, list[float]]] = {}  # per-round ms of every timed variant, saved in the JSON


@dataclass(frozen=True)
class Plan:
    """How many samples each section takes (the default plan fits ~5 minutes on 2 cores at 30 layers)."""

    layers: int
    merge_rounds: int
    prefill_rounds: int
    decode_rounds: int
    swap_calls: int
    peft_swap_budget_s: float


def make_plan(quick: bool, layers: int) -> Plan:
    if quick:
        return Plan(
            layers, merge_rounds=2, prefill_rounds=2, decode_rounds=4, swap_calls=200, peft_swap_budget_s=1
        )
    return Plan(
        layers, merge_rounds=3, prefill_rounds=3, decode_rounds=10, swap_calls=1000, peft_swap_budget_s=3
    )


# ---------------------------------------------------------------------------- models
def build_base(layers: int) -> nn.Module:
    """A Llama with SmolLM2-135M's shapes and random weights (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
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


def load_real() -> nn.Module:
    """The packaged SmolLM2-135M (30 layers), or exit with the install hint."""
    try:
        from adapters_mtl.data.bases import load_smollm2
    except ImportError as exc:  # the loader module is optional for this script
        sys.exit(f"--real needs adapters_mtl.data.bases.load_smollm2: {exc}")
    try:
        model, _ = load_smollm2()
    except RuntimeError as exc:  # ModelNotInstalledError names the pip command
        sys.exit(f"--real: {exc}")
    return model.eval()


def lora_config() -> LoraConfig:
    return LoraConfig(r=RANK, alpha=ALPHA, targets=TARGETS, init="random")


def grow_ours(model: AdapterModel, n: int) -> None:
    """Add adapters a{k} until ``n`` are loaded (random B, so every adapter really changes the output)."""
    for i in range(len(model.adapter_names), n):
        model.add_adapter(f"a{i}", lora_config(), trainable=False)


def make_peft(base: nn.Module, ours: AdapterModel) -> Any:
    """PEFT on a deep copy of ``base`` holding the values of ours' ``a0``."""
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), peft_config(), adapter_name="a0")
    copy_into_peft(model, ours, "a0")
    return model.eval()


def peft_config() -> Any:
    import peft

    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), init_lora_weights=False)


def grow_peft(model: Any, ours: AdapterModel, n: int) -> None:
    """Add PEFT adapters a{k} until ``n`` are loaded, each a copy of ours' adapter of the same name."""
    for i in range(len(model.peft_config), n):
        model.add_adapter(f"a{i}", peft_config())
        copy_into_peft(model, ours, f"a{i}")
    model.eval()


@torch.no_grad()
def copy_into_peft(model: Any, ours: AdapterModel, name: str) -> None:
    # to_peft_state_dict gives PEFT's saved keys, "base_model.model.<path>.lora_A.weight", which are
    # also module paths inside a PeftModel: copy straight into its per-adapter Linear (fast, no loader).
    for key, tensor in to_peft_state_dict(ours, name).items():
        path, kind, _ = key.rsplit(".", 2)
        getattr(model.get_submodule(path), kind)[name].weight.copy_(tensor)


# ---------------------------------------------------------------------------- inputs and timing
def prefill_inputs(B: int, T: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, VOCAB, (B, T), generator=g),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
    }


def row_names(n: int, B: int) -> list[str]:
    """One adapter per row: rows cycle through a0..a{n-1}; with n > B, B distinct ones spread over all n."""
    if n <= B:
        return [f"a{i % n}" for i in range(B)]
    return [f"a{(i * n) // B}" for i in range(B)]


def decode_stepper(call: Callable[..., Any], B: int, past: int) -> Callable[..., Any]:
    """A function running one decode step (T=1) of ``call`` on a KV cache of exactly ``past`` tokens.

    The cache is filled once; each step first crops the previous step's token so every step sees the
    same cache length (otherwise later variants would attend over longer caches).
    """
    out = call(**prefill_inputs(B, past, seed=2), use_cache=True, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    token = torch.randint(3, VOCAB, (B, 1), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(B, past + 1, dtype=torch.long)

    def step(**extra: Any) -> Any:
        grown = cache.get_seq_length() - past
        if grown:
            cache.crop(-grown)
        return call(
            input_ids=token, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **extra
        )

    return step


def rounds(fns: dict[str, Fn], repeat: int, seed: int = 0) -> dict[str, list[float]]:
    """ms of every variant in each of ``repeat`` rounds (after one warm-up call each).

    Each round runs every variant once in a shuffled order, so drift and order effects hit all alike.
    """
    order = list(fns)
    for key in order:
        fns[key]()  # warm-up: first-call allocations and lazily built routing state
    times: dict[str, list[float]] = {k: [] for k in order}
    rng = random.Random(seed)
    for _ in range(repeat):
        rng.shuffle(order)
        for key in order:
            t0 = time.perf_counter()
            fns[key]()
            times[key].append((time.perf_counter() - t0) * 1e3)
    return times


def med(times: dict[str, list[float]], key: str) -> float:
    return statistics.median(times[key])


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median of the per-round ratios num/den (paired: a slow round slows both)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


# ---------------------------------------------------------------------------- section 1
def section_merge(base: nn.Module, ours: AdapterModel, peft_m: Any, plan: Plan) -> list[dict]:
    """Base vs one unmerged LoRA vs merged, prefill B=16 T=128."""
    x = prefill_inputs(PREFILL_B, PREFILL_T)
    ours.activate("a0")
    peft_m.set_adapter("a0")
    fns: dict[str, Fn] = {
        "base": lambda: base(**x, logits_to_keep=1),
        "ours": lambda: ours(**x, logits_to_keep=1),
        "peft": lambda: peft_m(**x, logits_to_keep=1),
    }
    with torch.inference_mode():
        unmerged = rounds(fns, plan.merge_rounds)
        ours.merge("a0")
        peft_m.merge_adapter()
        try:
            merged = rounds(fns, plan.merge_rounds, seed=1)
        finally:
            ours.unmerge()
            peft_m.unmerge_adapter()
    RAW["merge_unmerged"], RAW["merge_merged"] = unmerged, merged
    return [
        {
            "library": "adapters_mtl" if lib == "ours" else "peft",
            "base_ms": med(unmerged, "base"),
            "unmerged_ms": med(unmerged, lib),
            "merged_ms": med(merged, lib),
            "unmerged_vs_base": ratio(unmerged, lib, "base"),
            "merged_vs_base": ratio(merged, lib, "base"),
        }
        for lib in ("ours", "peft")
    ]


# ---------------------------------------------------------------------------- section 2
def section_mixed(ours: AdapterModel, peft_m: Any, plan: Plan) -> list[dict]:
    """Mixed batches (gather, group, PEFT adapter_names) vs a single-adapter batch, prefill and decode."""
    assert len(ours.adapter_names) >= max(MIXED_COUNTS) and len(peft_m.peft_config) >= max(MIXED_COUNTS)
    ours.activate("a0")
    peft_m.set_adapter("a0")
    rows: list[dict] = []
    with torch.inference_mode():
        x = prefill_inputs(PREFILL_B, PREFILL_T)

        def ours_prefill(**kw: Any) -> Any:
            return ours(**x, logits_to_keep=1, **kw)

        def peft_prefill(**kw: Any) -> Any:
            return peft_m(**x, logits_to_keep=1, **kw)

        shapes = [
            (f"prefill B={PREFILL_B} T={PREFILL_T}", PREFILL_B, PREFILL_T, ours_prefill, peft_prefill),
            (
                f"decode B={DECODE_B} T=1 (cache {DECODE_PAST})",
                DECODE_B,
                1,
                decode_stepper(ours, DECODE_B, DECODE_PAST),
                decode_stepper(peft_m, DECODE_B, DECODE_PAST),
            ),
        ]
        for shape, B, T, run_ours, run_peft in shapes:
            times = rounds(mixed_variants(ours, B, run_ours, run_peft), rounds_for(plan, T))
            RAW[f"mixed {shape}"] = times
            ours.routing_strategy = "gather"  # the variants switch it; leave the default behind
            rows += mixed_rows(shape, B, B * T, times)
            for r in rows[-len(MIXED_COUNTS) :]:
                print(
                    f"  {shape} N={r['adapters_loaded']}: gather {r['gather_vs_single']:.2f}x single, "
                    f"group {r['group_vs_single']:.2f}x, segment {r['segment_vs_single']:.2f}x, "
                    f"PEFT {r['peft_vs_single']:.2f}x, "
                    f"gather/PEFT {r['gather_vs_peft']:.2f}x",
                    flush=True,
                )
    return rows


def rounds_for(plan: Plan, T: int) -> int:
    return plan.prefill_rounds if T > 1 else plan.decode_rounds


def mixed_variants(ours: AdapterModel, B: int, run_ours: Callable, run_peft: Callable) -> dict[str, Fn]:
    """All variants of one shape, timed together so every ratio is paired within a round."""

    def routed(names: list[str], strategy: str) -> Fn:
        def fn() -> object:
            ours.routing_strategy = strategy
            return run_ours(adapters=names)

        return fn

    fns: dict[str, Fn] = {
        "single_ours": lambda: run_ours(adapters="a0"),
        "single_peft": lambda: run_peft(),  # PEFT's active adapter a0: its plain LoRA path
    }
    for n in MIXED_COUNTS:
        names = row_names(n, B)
        if n > 1:
            # N=1: every row names a0, which ours routes exactly like adapters="a0": not timed twice.
            for strategy in STRATEGIES:
                fns[f"{strategy}:{n}"] = routed(names, strategy)
        fns[f"peft:{n}"] = lambda names=names: run_peft(adapter_names=names)
    return fns


def mixed_rows(shape: str, B: int, tokens: int, times: dict[str, list[float]]) -> list[dict]:
    def tok_s(key: str) -> float:
        return tokens / med(times, key) * 1e3

    rows = []
    for n in MIXED_COUNTS:
        same = n == 1  # ours' N=1 is the single-adapter path itself
        p = f"peft:{n}"
        row = {
            "shape": shape,
            "adapters_loaded": n,
            "distinct_in_batch": len(set(row_names(n, B))),
            "ours_single_tok_s": tok_s("single_ours"),
            "peft_single_tok_s": tok_s("single_peft"),
            "peft_tok_s": tok_s(p),
            "peft_vs_single": ratio(times, "single_peft", p),  # throughput ratios = inverse time ratios
            "ours_same_path_as_single": same,
        }
        for strategy in STRATEGIES:
            key = "single_ours" if same else f"{strategy}:{n}"
            row[f"{strategy}_tok_s"] = tok_s(key)
            row[f"{strategy}_vs_single"] = ratio(times, "single_ours", key)
            row[f"{strategy}_vs_peft"] = ratio(times, p, key)
        rows.append(row)
    return rows


@torch.no_grad()
def parity(ours: AdapterModel, peft_m: Any, n: int) -> dict[str, float]:
    """Max |logit difference| on a small mixed batch: ours (both strategies) vs PEFT, same weights.

    ``lora_effect`` (ours vs the bare base) shows the adapters really change the output, so the
    timings are not of a no-op.
    """
    names = row_names(n, n)
    x = prefill_inputs(n, 8, seed=4)
    out: dict[str, torch.Tensor] = {}
    try:
        for strategy in STRATEGIES:
            ours.routing_strategy = strategy
            out[strategy] = ours(**x, adapters=names, logits_to_keep=1).logits
    finally:
        ours.routing_strategy = "gather"
    out["base"] = ours(**x, adapters=None, logits_to_keep=1).logits
    out["peft"] = peft_m(**x, adapter_names=names, logits_to_keep=1).logits

    def diff(a: str, b: str) -> float:
        return (out[a] - out[b]).abs().max().item()

    return {
        "adapters": n,
        "gather_vs_peft": diff("gather", "peft"),
        "group_vs_peft": diff("group", "peft"),
        "segment_vs_peft": diff("segment", "peft"),
        "lora_effect": diff("gather", "base"),
    }


# ---------------------------------------------------------------------------- section 3
def activate_row(ours: AdapterModel, peft_m: Any | None, new: list[str], plan: Plan) -> dict:
    """activate() latency with the adapters now loaded.

    ``new`` are the names added since the last row: their first activation builds and caches the
    name's routing selection, so it is reported apart from the steady state.
    """
    names = list(ours.adapter_names)
    n = len(names)
    ours.activate(None)
    first = [_time_us(ours.activate, name) for name in new]
    row = {
        "adapters_loaded": n,
        "ours_activate_us": _swap_us(ours.activate, names, plan.swap_calls, budget_s=2),
        "ours_first_activate_us": statistics.median(first),
        "peft_set_adapter_us": None,
        "peft_calls": 0,
    }
    if peft_m is not None:
        row["peft_set_adapter_us"], row["peft_calls"] = _swap_us_counted(
            peft_m.set_adapter, list(peft_m.peft_config), plan.swap_calls, plan.peft_swap_budget_s
        )
    ours.activate("a0")
    peft_us = row["peft_set_adapter_us"]
    print(
        f"  activate with {n} loaded: ours {row['ours_activate_us']:.1f} us, "
        f"PEFT {'not run' if peft_us is None else f'{peft_us:.0f} us'}",
        flush=True,
    )
    return row


def new_names(ours: AdapterModel, seen: list[str]) -> list[str]:
    """Names loaded since the last call (``seen`` is updated in place)."""
    new = ours.adapter_names[len(seen) :]
    seen.extend(new)
    return new


def _time_us(fn: Callable[[str], object], arg: str) -> float:
    t0 = time.perf_counter()
    fn(arg)
    return (time.perf_counter() - t0) * 1e6


def _swap_us(swap: Callable[[str], object], names: list[str], calls: int, budget_s: float) -> float:
    return _swap_us_counted(swap, names, calls, budget_s)[0]


def _swap_us_counted(
    swap: Callable[[str], object], names: list[str], calls: int, budget_s: float
) -> tuple[float, int]:
    """Median µs of ``swap(name)``, names visited in a scattered order; stops early past ``budget_s``
    (PEFT's set_adapter takes tens of ms with many adapters) but always takes at least 5 samples."""
    times: list[float] = []
    start = time.perf_counter()
    for i in range(calls):
        times.append(_time_us(swap, names[(i * 7919) % len(names)]))
        if len(times) >= 5 and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times), len(times)


# ---------------------------------------------------------------------------- report
def machine_info(plan: Plan, real: bool) -> dict:
    import peft
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg_1m_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "model": "SmolLM2-135M (real weights)" if real else "Llama, SmolLM2-135M shapes, random fp32 weights",
        "lora": f"r={RANK} alpha={ALPHA} on {'+'.join(TARGETS)}",
        "plan": asdict(plan),
    }


def machine_busy_s() -> float:
    """CPU seconds all processes have spent busy (non-idle) since boot, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # guest time is already counted in user/nice, so only the first 8 fields are summed
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def goals(result: dict) -> list[dict]:
    """Each goal with the measured value (ours' default strategy, gather)."""
    ours = next(r for r in result["merge"] if r["library"] == "adapters_mtl")
    # paired: the median of the per-round time ratios (a slow round slows both libraries)
    vs_peft = ratio(RAW["merge_unmerged"], "ours", "peft") if "merge_unmerged" in RAW else float("nan")
    n_max = max(MIXED_COUNTS)
    at_max = {r["shape"].split()[0]: r for r in result["mixed"] if r["adapters_loaded"] == n_max}
    act = [r["ours_activate_us"] for r in result["activate"]]
    checks = [
        (
            "unmerged LoRA / base (prefill)",
            ours["unmerged_vs_base"],
            f"<= {GOALS['unmerged']}",
            ours["unmerged_vs_base"] <= GOALS["unmerged"],
        ),
        (
            "merged / base (prefill)",
            ours["merged_vs_base"],
            f"<= {GOALS['merged']}",
            ours["merged_vs_base"] <= GOALS["merged"],
        ),
        (
            "unmerged LoRA: ours / PEFT time (prefill)",
            vs_peft,
            f"<= {GOALS['unmerged_vs_peft']:.2f}",
            vs_peft <= GOALS["unmerged_vs_peft"],
        ),
    ]
    for kind, r in at_max.items():
        checks.append(
            (
                f"{kind} N={n_max} gather / single",
                r["gather_vs_single"],
                f">= {GOALS['mixed_vs_single']}",
                r["gather_vs_single"] >= GOALS["mixed_vs_single"],
            )
        )
    dec = at_max["decode"]
    checks.append(
        (
            f"decode N={n_max} ours gather / PEFT",
            dec["gather_vs_peft"],
            f">= {GOALS['vs_peft_decode']}",
            dec["gather_vs_peft"] >= GOALS["vs_peft_decode"],
        )
    )
    checks.append(
        ("activate() max µs", max(act), f"< {GOALS['activate_us']}", max(act) < GOALS["activate_us"])
    )
    checks.append(("activate() max/min (flat)", max(act) / min(act), "<= 2", max(act) / min(act) <= 2))
    return [{"goal": g, "measured": round(v, 3), "target": t, "met": bool(ok)} for g, v, t, ok in checks]


def print_tables(result: dict) -> None:
    m = result["machine"]
    print(
        f"\n{m['model']}, {m['plan']['layers']} layers; LoRA {m['lora']}; torch {m['torch']}, "
        f"peft {m['peft']}, {m['threads']} threads on {m['cpu']}; {m['date']}"
    )
    if m.get("busy_warning"):
        print(
            f"WARNING: other processes used up to {m['others_cpu_share_max']:.0%} of the CPU during a stage "
            "(see others_cpu_share_per_stage in the JSON): timings are inflated and noisy; rerun when quiet."
        )
    print(f"\n### Base vs one unmerged LoRA vs merged (prefill B={PREFILL_B}, T={PREFILL_T})\n")
    print("| library | base ms | unmerged ms | merged ms | unmerged / base | merged / base |")
    print("|---|---|---|---|---|---|")
    for r in result["merge"]:
        print(
            f"| {r['library']} | {r['base_ms']:.0f} | {r['unmerged_ms']:.0f} | {r['merged_ms']:.0f} | "
            f"{r['unmerged_vs_base']:.3f}× | {r['merged_vs_base']:.3f}× |"
        )
    print(
        "\n### Mixed batches: N distinct adapters vs a single-adapter batch (tok/s; ratios are paired medians)\n"
    )
    print(
        "| shape | adapters loaded (distinct in batch) | ours single tok/s | ours gather tok/s | gather / single "
        "| group / single | segment / single | PEFT single tok/s | PEFT adapter_names tok/s | PEFT / single "
        "| ours gather / PEFT | ours group / PEFT | ours segment / PEFT |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["mixed"]:
        note = " ᵃ" if r["ours_same_path_as_single"] else ""
        print(
            f"| {r['shape']} | {r['adapters_loaded']} ({r['distinct_in_batch']}) | {r['ours_single_tok_s']:.0f} | "
            f"{r['gather_tok_s']:.0f}{note} | {r['gather_vs_single']:.2f}×{note} | "
            f"{r['group_vs_single']:.2f}×{note} | {r['segment_vs_single']:.2f}×{note} | "
            f"{r['peft_single_tok_s']:.0f} | {r['peft_tok_s']:.0f} | {r['peft_vs_single']:.2f}× | "
            f"{r['gather_vs_peft']:.2f}× | {r['group_vs_peft']:.2f}× | {r['segment_vs_peft']:.2f}× |"
        )
    print(
        "\nᵃ N=1: every row uses a0, which ours routes exactly as a single-adapter batch (not timed twice).\n"
        f"For prefill N=64, 64 adapters are loaded and the {PREFILL_B} rows use {PREFILL_B} distinct ones."
    )
    p = result["parity"]
    print(
        f"\nParity (same LoRA values, {p['adapters']} adapters, max |Δlogit|): gather vs PEFT {p['gather_vs_peft']:.1e}, "
        f"group vs PEFT {p['group_vs_peft']:.1e}, segment vs PEFT {p['segment_vs_peft']:.1e}; LoRA effect vs base {p['lora_effect']:.1e}"
    )
    print("\n### Hot swap: activate(name) vs PEFT set_adapter(name) (median µs)\n")
    print(
        "| adapters loaded | ours activate() µs | ours first activate of a name µs | PEFT set_adapter() µs |"
    )
    print("|---|---|---|---|")
    for r in result["activate"]:
        peft_us = r["peft_set_adapter_us"]
        peft_cell = f"{peft_us:,.0f} ({r['peft_calls']} calls)" if peft_us is not None else "not run ᵇ"
        print(
            f"| {r['adapters_loaded']} | {r['ours_activate_us']:.1f} | {r['ours_first_activate_us']:.1f} | {peft_cell} |"
        )
    print(f"\nᵇ PEFT capped at {PEFT_ACTIVATE_MAX} adapters: creating 256 PEFT adapters takes minutes here.")
    print("\n### Goals\n")
    print("| goal | measured | target | met |")
    print("|---|---|---|---|")
    for g in result["goals"]:
        print(f"| {g['goal']} | {g['measured']} | {g['target']} | {'yes' if g['met'] else 'NO'} |")


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 layers, fewer rounds (~1 min)")
    parser.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default 30, or 4 with --quick)"
    )
    parser.add_argument("--real", action="store_true", help="load the real SmolLM2-135M instead (30 layers)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "bench_routing.json",
        help="JSON output",
    )
    return parser.parse_args(argv)


class Stages:
    """Prints each stage as it starts and records its wall time (the JSON shows where the run went)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.others_cpu: dict[str, float] = {}  # share of the machine's CPU other processes used

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(name, flush=True)
        t0, busy0, own0 = time.perf_counter(), machine_busy_s(), own_cpu_s()
        try:
            yield
        finally:
            wall = time.perf_counter() - t0
            self.seconds[name] = round(wall, 1)
            others = machine_busy_s() - busy0 - (own_cpu_s() - own0)
            self.others_cpu[name] = round(max(others, 0.0) / (wall * (os.cpu_count() or 1)), 3)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Fixed thread count: comparable runs, and tests may share the 2-core machine.
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    stage = Stages()
    with stage("build models"):
        base = load_real() if args.real else build_base(args.layers or (4 if args.quick else 30))
        plan = make_plan(args.quick, base.config.num_hidden_layers)
        info = machine_info(plan, args.real)
        print(f"  {info['model']}, {plan.layers} layers; load average {info['load_avg_1m_at_start']:.2f}")
        ours = AdapterModel(copy.deepcopy(base)).eval()
        grow_ours(ours, 1)
        peft_m = make_peft(base, ours)

    with stage("section 1: base / unmerged / merged"):
        merge_rows = section_merge(base, ours, peft_m, plan)

    # Sections 2 and 3 share models that grow: activate() is timed at each count on the way up, the
    # mixed batches when 64 are loaded (both libraries), and ours alone goes on to 256.
    activate_rows: list[dict] = []
    seen: list[str] = []
    with stage(f"section 3: activate, up to {PEFT_ACTIVATE_MAX} loaded (adds PEFT adapters: slow)"):
        for n in (c for c in ACTIVATE_COUNTS if c <= PEFT_ACTIVATE_MAX):
            grow_ours(ours, n)
            grow_peft(peft_m, ours, n)
            activate_rows.append(activate_row(ours, peft_m, new_names(ours, seen), plan))
    with stage("parity check"):
        parity_row = parity(ours, peft_m, max(MIXED_COUNTS))
    with stage("section 2: mixed batches"):
        mixed = section_mixed(ours, peft_m, plan)
    del peft_m  # free its memory before growing ours further
    with stage("section 3: activate, ours only beyond"):
        for n in (c for c in ACTIVATE_COUNTS if c > PEFT_ACTIVATE_MAX):
            grow_ours(ours, n)
            activate_rows.append(activate_row(ours, None, new_names(ours, seen), plan))

    # Other processes on the (shared) CPU inflate the ms columns and add noise (less so to the paired
    # ratios): record how much CPU they took during each stage and warn past 10 %.
    info["others_cpu_share_per_stage"] = stage.others_cpu
    info["others_cpu_share_max"] = max(stage.others_cpu.values())
    info["busy_warning"] = info["others_cpu_share_max"] > 0.10
    result: dict[str, Any] = {
        "machine": info,
        "merge": merge_rows,
        "mixed": mixed,
        "parity": parity_row,
        "activate": activate_rows,
    }
    result["goals"] = goals(result)
    result["stage_seconds"] = stage.seconds
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["raw_ms_per_round"] = RAW
    print_tables(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s; stages: {stage.seconds})")


if __name__ == "__main__":
    main()
