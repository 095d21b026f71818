"""Registry benchmark: publish and load an r=8 LoRA adapter vs a raw safetensors read vs PEFT's load_adapter.

Shapes: MiniLM-L6 (BERT, 6 layers, hidden 384; LoRA on query+value) and SmolLM2-135M (Llama, 30 layers,
hidden 576; LoRA on q_proj+v_proj), random weights built from configs (no download).
Our load includes everything a safe load does: sha256 of every file, config and shape checks, base
fingerprint check, attaching the adapter. Goals, per shape:
  * load ≤ 2× a raw read: ``registry.load`` / ``safetensors.load_file`` of the same file (medians of
    interleaved rounds, with 1 adapter already attached);
  * flat in the number of adapters already loaded: ``registry.load`` with 64 already attached / with 1
    (≤ 1.2); 16 is measured too. Each timed load is removed again untimed, so every round loads into the
    same number of adapters.
``--old-paths`` measures the code paths this benchmark's goals replaced, in the same run: the base
fingerprint keyed by ``named_parameters()`` (every adapter's parameters), one ``isfinite`` per tensor,
every resolve re-listing the store and querying SQLite, target matching on every attach.
Prints markdown tables and writes JSON (``rows`` as before, ``goals``: {"goal", "measured", "target",
"met"}). Usage:
  python benchmarks/bench_registry.py [--repeat 15] [--old-paths] [--out benchmarks/results/bench_registry.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from adapters_mtl import AdapterModel, LoraConfig
from adapters_mtl.files.folder import load_adapter
from adapters_mtl.registry import AdapterRegistry

LOADED = (1, 16, 64)  # adapters already attached when one more is loaded (the "flat" goal)
GOAL_VS_RAW = 2.0
GOAL_FLAT = 1.2


def minilm_shape() -> tuple[torch.nn.Module, tuple[str, ...]]:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        attn_implementation="sdpa",
    )
    return BertModel(cfg).eval(), ("query", "value")


def smollm2_shape() -> tuple[torch.nn.Module, tuple[str, ...]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval(), ("q_proj", "v_proj")


def median_ms(fn: Callable[[int], object], repeat: int) -> float:
    fn(-1)  # warm-up
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median ms of each function, run in turn within each round (drifting machine load hits all alike);
    only what ``fn`` does is timed (an ``undo`` it returns runs untimed)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        undo = fn()
        if callable(undo):
            undo()
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            undo = fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
            if callable(undo):
                undo()
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def old_paths(registry: AdapterRegistry) -> Iterator[None]:
    """The code paths this benchmark's goals replaced, patched in for a comparison in the same run."""
    from adapters_mtl.files import fingerprint, safe_read
    from adapters_mtl.methods.lora import LoraMethod

    def named_parameters_key(backbone: torch.nn.Module, model: AdapterModel) -> tuple:
        methods = model.methods
        return tuple(
            (p.data_ptr(), p.dtype, p._version)  # noqa: SLF001
            for k, p in backbone.named_parameters()
            if not p.requires_grad and not any(m.owns_parameter(k, p) for m in methods)
        )

    saved = (fingerprint._base_state, safe_read._all_finite, LoraMethod._match)  # noqa: SLF001
    fingerprint._base_state = named_parameters_key  # type: ignore[assignment]  # noqa: SLF001
    safe_read._all_finite = lambda _data, tensors: not safe_read._nonfinite(tensors)  # noqa: SLF001
    LoraMethod._match = LoraMethod._match_uncached  # type: ignore[method-assign]  # noqa: SLF001
    registry._files_look = lambda _name: None  # type: ignore[method-assign]  # noqa: SLF001
    try:
        yield
    finally:
        fingerprint._base_state, safe_read._all_finite, LoraMethod._match = saved  # type: ignore[method-assign]  # noqa: SLF001
        del registry._files_look  # noqa: SLF001


def bench(
    label: str,
    build: Callable[[], tuple[torch.nn.Module, tuple[str, ...]]],
    repeat: int,
    tmp: Path,
    old: bool,
) -> dict:
    import peft
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base, targets = build()
    model = AdapterModel(copy.deepcopy(base)).eval()
    model.add_adapter("task", LoraConfig(r=8, alpha=16, targets=targets, init="random"))
    registry = AdapterRegistry(tmp / f"reg-{label.split()[0]}")
    publish_ms = median_ms(lambda _i: registry.publish(model, adapter="task"), repeat)
    folder = registry.fetch("task@1")
    weights = folder / "adapter_model.safetensors"
    # a resolve answers from memory once the name's folder is 2 s old (a younger one may still change
    # within one tick of the file system's clock): loads of a published adapter come later than that
    time.sleep(2.1)

    target = AdapterModel(copy.deepcopy(base)).eval()
    by_loaded: dict[int, dict[str, float]] = {}
    with old_paths(registry) if old else contextlib.nullcontext():
        for n in LOADED:
            while len(target.adapter_names) < n:
                registry.load(target, "task@1", name=f"pre{len(target.adapter_names)}")

            def via_registry() -> Callable[[], None]:
                registry.load(target, "task@1", name="timed")
                return lambda: target.remove_adapter("timed")

            def ours() -> Callable[[], None]:
                load_adapter(target, folder, name="timed")
                return lambda: target.remove_adapter("timed")

            by_loaded[n] = interleaved_ms(
                {"raw": lambda: load_file(str(weights)), "registry": via_registry, "ours": ours}, repeat
            )
    first = by_loaded[LOADED[0]]
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder), adapter_name="first")
    peft_ms = median_ms(lambda i: peft_model.load_adapter(str(folder), adapter_name=f"x{i + 1}"), repeat)
    flat = by_loaded[LOADED[-1]]["registry"] / first["registry"]
    return {
        "shape": label,
        "file_kib": weights.stat().st_size / 1024,
        "publish_ms": publish_ms,
        "raw_read_ms": first["raw"],
        "ours_load_ms": first["ours"],
        "registry_load_ms": first["registry"],
        "peft_load_adapter_ms": peft_ms,
        "ours_vs_raw": first["ours"] / first["raw"],
        "ours_vs_peft": peft_ms / first["ours"],
        "registry_vs_raw": first["registry"] / first["raw"],
        "registry_load_ms_by_loaded": {str(n): by_loaded[n]["registry"] for n in LOADED},
        "raw_read_ms_by_loaded": {str(n): by_loaded[n]["raw"] for n in LOADED},
        "flat_ratio": flat,
        "old_paths": old,
    }


def goals(row: dict) -> list[dict]:
    shape = row["shape"].split(" (")[0]
    return [
        {
            "goal": f"registry: load ≤ 2× a raw safetensors read ({shape}, registry.load / load_file)",
            "measured": round(row["registry_vs_raw"], 2),
            "target": GOAL_VS_RAW,
            "met": row["registry_vs_raw"] <= GOAL_VS_RAW,
        },
        {
            "goal": f"registry: load flat in adapters already loaded ({shape}, load@{LOADED[-1]} / load@{LOADED[0]})",
            "measured": round(row["flat_ratio"], 2),
            "target": GOAL_FLAT,
            "met": row["flat_ratio"] <= GOAL_FLAT,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument(
        "--old-paths", action="store_true", help="measure the replaced (slower) code paths instead"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: results/bench_registry.json")
    args = parser.parse_args()
    results = Path(__file__).parent / "results"
    # the old paths' numbers are a comparison, not this code's goals: their own file, without "goals"
    args.out = args.out or results / (
        "bench_registry_old_paths.json" if args.old_paths else "bench_registry.json"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, build in (
            ("MiniLM-L6 (6 layers, r=8)", minilm_shape),
            ("SmolLM2-135M (30 layers, r=8)", smollm2_shape),
        ):
            rows.append(bench(label, build, args.repeat, Path(tmp), args.old_paths))
            print(f"  {label}: done", flush=True)
    print(
        "\n| shape | file KiB | publish ms | raw safetensors read ms | our load ms (verified) | registry.load ms | PEFT load_adapter ms | ours / raw | registry / raw | PEFT / ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['file_kib']:.0f} | {r['publish_ms']:.1f} | {r['raw_read_ms']:.2f} | "
            f"{r['ours_load_ms']:.1f} | {r['registry_load_ms']:.1f} | {r['peft_load_adapter_ms']:.1f} | "
            f"{r['ours_vs_raw']:.1f}x | {r['registry_vs_raw']:.1f}x | {r['ours_vs_peft']:.1f}x |"
        )
    print("\n| shape | " + " | ".join(f"registry.load ms, {n} loaded" for n in LOADED) + " | flat ratio |")
    print("|---|" + "---|" * (len(LOADED) + 1))
    for r in rows:
        by = r["registry_load_ms_by_loaded"]
        print(
            f"| {r['shape']} | "
            + " | ".join(f"{by[str(n)]:.1f}" for n in LOADED)
            + f" | {r['flat_ratio']:.2f} |"
        )
    all_goals = [g for r in rows for g in goals(r)]
    print("\n| goal | measured | target | met |")
    print("|---|---|---|---|")
    for g in all_goals:
        print(f"| {g['goal']} | {g['measured']} | ≤ {g['target']} | {'yes' if g['met'] else 'no'} |")
    result = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "old_paths": args.old_paths,
        "rows": rows,
        **({} if args.old_paths else {"goals": all_goals}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
