"""Memory and accuracy of adapters on a quantized base: fp32 / bf16 / int8 / NF4 MiniLM-L6 (bitsandbytes).

Memory: for each base precision and N = 1, 16, 256 LoRA adapters (r=8 on every Linear of the encoder, the
single-task recipe's adapters), one fresh subprocess builds MiniLM-L6 from its config (random weights: the
bytes are the real model's), quantizes it, attaches the N adapters (``compact()``: no spare capacity) and
runs one routed batch (16 rows, 64 tokens, a different adapter per row). It reports the bytes of every
storage, counted once (base: weights, biases, embeddings and the quantization state; adapters: the LoRA
stacks), the resident set after loading (freed memory trimmed back to the OS), the peak resident set of
the whole process, and the routed forward time.

Accuracy: the single-task LoRA recipe (all-linear r=8, both real tasks: BBC headlines and tweets, the quality
benchmark's fixed splits with 445/410 test texts) trained once on the fp32 base; its adapters are then
evaluated on the same base loaded in bf16, int8 and NF4 (post-training quantization of the base), and the
recipe is trained again on the quantized bases (QLoRA: fp32 adapters on an int8 / NF4 base).

Usage (heavy: wrap it in ``flock /tmp/bench.lock``):
  python benchmarks/bench_memory.py [--steps 400] [--seed 0] [--train-on fp32 nf4 int8] [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

BASES = ("fp32", "bf16", "int8", "nf4")
COUNTS = (1, 16, 256)
TASKS = ("news", "tone")
RECIPE = Path(__file__).parents[1] / "recipes" / "single_task_lora.yaml"
# the quality benchmark's fixed splits (>= 400 test texts per task)
DATA = [
    "tasks.0.limit=null",
    "tasks.0.splits=[0.7,0.1,0.2]",
    "tasks.1.limit=2050",
    "tasks.1.splits=[0.6,0.2,0.2]",
]


# ------------------------------------------------------------------------------------------- memory
def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _trim() -> None:
    """Give freed heap pages back to the OS (glibc), so the resident set is what is still in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the resident set may include freed pages
        pass


def _storage_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors`` not already in ``seen`` (views share their storage)."""
    total = 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def measure(base_kind: str, n: int) -> dict[str, Any]:
    """One configuration, in this process (run it in a fresh one): bytes, resident set, forward time."""
    import resource

    from transformers import AutoConfig, BertModel

    from adapters_mtl import AdapterModel, LoraConfig
    from adapters_mtl.core.quantize import quantize_base
    from adapters_mtl.data.bases import minilm_path
    from adapters_mtl.methods.lora_layer import LoraLayer

    torch.manual_seed(0)
    rss_imports = _rss_now()
    config = AutoConfig.from_pretrained(minilm_path(), local_files_only=True)
    base = BertModel(config).eval()  # what load_minilm() gives (AutoModel: pooler included)
    if base_kind == "bf16":
        base = base.to(torch.bfloat16)
    quantize_base(base, None if base_kind in ("fp32", "bf16") else base_kind)
    model = AdapterModel(base)
    for i in range(n):  # the single-task recipe's adapter
        model.add_adapter(f"a{i}", LoraConfig(r=8, alpha=16, targets="all-linear"))
    model.compact()
    model.eval()
    _trim()
    rss_loaded = _rss_now()
    seen: set[int] = set()
    layers = [m for m in model.base.modules() if isinstance(m, LoraLayer)]
    adapter_tensors = [t for la in layers for t in (la.stack_A, la.stack_B, la.scales)]
    adapter_tensors += [p for name in model.adapter_names for p in model.adapter_parameters(name).values()]
    adapter_bytes = _storage_bytes(adapter_tensors, seen)
    # the Linear layers (what quantization compresses: weights, biases, absmax/quant map) first, then the
    # rest of the base (embeddings, layer norms: kept as loaded)
    linears = [m.base_layer for m in layers]
    linear_tensors = [t for m in linears for t in m.state_dict(keep_vars=True).values()]
    linear_bytes = _storage_bytes(linear_tensors, seen)
    base_tensors = [t for t in model.base.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]
    base_bytes = linear_bytes + _storage_bytes(base_tensors, seen)
    ids = torch.randint(1000, 20000, (16, 64))
    names = [f"a{i % n}" for i in range(16)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), adapters=names)  # warm-up
        t0 = time.perf_counter()
        for _ in range(3):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), adapters=names)
        forward_ms = (time.perf_counter() - t0) / 3 * 1e3
    # int8: bitsandbytes moves the row scales into the layer's state on the first call
    scales = [s for m in linears if (s := getattr(getattr(m, "state", None), "SCB", None)) is not None]
    extra = _storage_bytes(scales, seen)
    linear_bytes, base_bytes = linear_bytes + extra, base_bytes + extra
    lora_dtype = layers[0].stack_A.dtype if layers else None
    return {
        "base": base_kind,
        "adapters": n,
        "adapter_dtype": str(lora_dtype).removeprefix("torch."),
        "base_bytes": base_bytes,
        "linear_bytes": linear_bytes,
        "adapter_bytes": adapter_bytes,
        "adapter_params": sum(
            p.numel() for nm in model.adapter_names for p in model.adapter_parameters(nm).values()
        ),
        "rss_imports": rss_imports,
        "rss_loaded": rss_loaded,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "forward_ms": forward_ms,
    }


def memory_table() -> list[dict[str, Any]]:
    rows = []
    for base_kind in BASES:
        for n in COUNTS:
            cmd = [sys.executable, __file__, "--measure", base_kind, str(n)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(
                f"  {base_kind:>4} N={n:<3} base {row['base_bytes'] / 2**20:6.1f} MiB, adapters "
                f"{row['adapter_bytes'] / 2**20:6.1f} MiB, RSS {row['rss_loaded'] / 2**20:6.0f} MiB, "
                f"peak {row['peak_rss'] / 2**20:6.0f} MiB, {row['forward_ms']:.0f} ms",
                flush=True,
            )
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------- accuracy
def _train(kind: str, steps: int, seed: int, out: Path) -> dict[str, Any]:
    """The single-task LoRA recipe on the MiniLM base loaded with ``quantize=kind`` (fp32: as stored)."""
    import functools

    import adapters_mtl.data.bases as bases
    from adapters_mtl.apps.recipe import load_recipe, run_recipe

    overrides = [
        *DATA,
        f"train.steps={steps}",
        f"train.eval_every={max(steps // 4, 1)}",
        f"train.seed={seed}",
        f"train.output_dir={out / kind}",
        "train.checkpoint_every=null",
        "registry=null",
    ]
    original = bases.load_base
    if kind != "fp32":  # the recipe loads its base by name; here that base is loaded quantized
        bases.load_base = functools.partial(original, quantize=kind)  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        summary = run_recipe(load_recipe(RECIPE, overrides), overwrite=True)
    finally:
        bases.load_base = original
    return {
        "seconds": time.perf_counter() - t0,
        "test": {t: float(summary["test"][t]["accuracy"]) for t in TASKS},
        "adapters": summary["adapters"],
    }


@torch.no_grad()
def _evaluate(folders: dict[str, str], kind: str) -> dict[str, float]:
    """Test accuracy of the saved adapters on the MiniLM base loaded as ``kind``."""
    from adapters_mtl import AdapterModel
    from adapters_mtl.apps.recipe import load_recipe
    from adapters_mtl.data.bases import load_minilm
    from adapters_mtl.data.tasks import load_task
    from adapters_mtl.files.folder import load_adapter
    from adapters_mtl.training.objectives import evaluate_task

    spec = load_recipe(RECIPE, DATA)
    base, tok = load_minilm(
        dtype=torch.bfloat16 if kind == "bf16" else torch.float32,
        quantize=None if kind in ("fp32", "bf16") else kind,
    )
    model = AdapterModel(base).eval()
    out = {}
    for task in spec["tasks"]:
        # the card's base fingerprint is the fp32 base's: another precision of it is a different base
        load_adapter(model, folders[task.name], check_base=kind == "fp32")
        data = load_task(task)
        out[task.name] = float(evaluate_task(model, data, tok, task.name, "cpu", "test")["accuracy"])
    return out


def accuracy_table(steps: int, seed: int, train_on: list[str], out: Path) -> dict[str, Any]:
    trained = {}
    for kind in train_on:
        trained[kind] = _train(kind, steps, seed, out)
        print(f"  trained on {kind}: {trained[kind]['test']} ({trained[kind]['seconds']:.0f} s)", flush=True)
    ptq = {}
    if "fp32" in trained:
        for kind in BASES:
            t0 = time.perf_counter()
            ptq[kind] = _evaluate(trained["fp32"]["adapters"], kind)
            print(f"  fp32-trained adapters on a {kind} base: {ptq[kind]} ({time.perf_counter() - t0:.0f} s)")
    return {"trained": trained, "fp32_adapters_on": ptq}


# ------------------------------------------------------------------------------------------- report
def _mib(b: int) -> str:
    return f"{b / 2**20:.1f}"


def goals(rows: list[dict[str, Any]], acc: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    by = {(r["base"], r["adapters"]): r for r in rows}
    fp32, nf4 = by.get(("fp32", 1)), by.get(("nf4", 1))
    if fp32 and nf4:
        # 4 bits + one fp32 absmax per 64 weights: 4.5 of 32 bits, about 7x smaller
        ratio = fp32["linear_bytes"] / nf4["linear_bytes"]
        out.append(
            {
                "goal": "NF4 Linear layers at least 6x smaller than fp32 (embeddings are left as loaded)",
                "measured": round(ratio, 2),
                "target": 6.0,
                "met": ratio >= 6.0,
            }
        )
    if acc and "fp32" in acc["trained"]:
        ref = statistics.fmean(acc["trained"]["fp32"]["test"].values())
        for kind in ("int8", "nf4"):
            if kind in acc["trained"]:
                diff = 100 * (statistics.fmean(acc["trained"][kind]["test"].values()) - ref)
                out.append(
                    {
                        "goal": f"adapters trained on a {kind} base (QLoRA): mean test accuracy within 1 point of fp32",
                        "measured": round(diff, 2),
                        "target": -1.0,
                        "met": diff >= -1.0,
                    }
                )
            if kind in acc["fp32_adapters_on"]:
                diff = 100 * (statistics.fmean(acc["fp32_adapters_on"][kind].values()) - ref)
                out.append(
                    {
                        "goal": f"fp32-trained adapters served on a {kind} base: mean test accuracy within 1 point",
                        "measured": round(diff, 2),
                        "target": -1.0,
                        "met": diff >= -1.0,
                    }
                )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-on", nargs="+", default=["fp32", "nf4", "int8"], choices=BASES)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/memory"))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "bench_memory.json")
    parser.add_argument("--measure", nargs=2, metavar=("BASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:  # the child process of one configuration
        print(json.dumps(measure(args.measure[0], int(args.measure[1]))))
        return
    print("memory (one subprocess per configuration):", flush=True)
    rows = memory_table()
    acc = None if args.skip_accuracy else accuracy_table(args.steps, args.seed, args.train_on, args.out)
    when = datetime.date.today().isoformat()
    print(f"\n## Memory, MiniLM-L6 shape, LoRA r=8 on every encoder Linear, {when}\n")
    print(
        "| base | adapters | base MiB (its Linears) | adapters MiB (fp32) | RSS loaded MiB (over imports) "
        "| peak RSS MiB | routed forward ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['base']} | {r['adapters']} | {_mib(r['base_bytes'])} ({_mib(r['linear_bytes'])}) | "
            f"{_mib(r['adapter_bytes'])} | {r['rss_loaded'] / 2**20:.0f} "
            f"({(r['rss_loaded'] - r['rss_imports']) / 2**20:.0f}) | {r['peak_rss'] / 2**20:.0f} | "
            f"{r['forward_ms']:.0f} |"
        )
    if acc:
        print(f"\n## Test accuracy, real MiniLM-L6, single-task LoRA, {args.steps} steps, seed {args.seed}\n")
        print("| adapters | base at test | news acc | tone acc | mean |")
        print("|---|---|---:|---:|---:|")
        for kind, res in acc["trained"].items():
            t = res["test"]
            print(
                f"| trained on {kind} | {kind} | {t['news']:.3f} | {t['tone']:.3f} | {statistics.fmean(t.values()):.3f} |"
            )
        for kind, t in acc["fp32_adapters_on"].items():
            print(
                f"| trained on fp32 | {kind} | {t['news']:.3f} | {t['tone']:.3f} | {statistics.fmean(t.values()):.3f} |"
            )
    found = goals(rows, acc)
    for g in found:
        print(f"* {g['goal']}: {g['measured']} (target {g['target']}) {'met' if g['met'] else 'NOT met'}")
    result = {
        "date": when,
        "command": " ".join(["python benchmarks/bench_memory.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bitsandbytes": _version("bitsandbytes"),
        "memory": rows,
        "accuracy": acc,
        "goals": found,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {args.json}")


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
