"""Registry benchmark: publish and load an r=8 LoRA adapter vs a raw safetensors read vs PEFT's load_adapter.

Shapes: MiniLM-L6 (BERT, 6 layers, hidden 384; LoRA on query+value) and SmolLM2-135M (Llama, 30 layers,
hidden 576; LoRA on q_proj+v_proj), random weights built from configs (no download).
Our load includes everything a safe load does: sha256 of every file, config and shape checks, base
fingerprint check, attaching the adapter. Prints a markdown table and writes JSON. Usage:
  python benchmarks/bench_registry.py [--repeat 15] [--out benchmarks/results/bench_registry.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adapters_mtl import AdapterModel, LoraConfig
from adapters_mtl.files.folder import load_adapter
from adapters_mtl.registry import AdapterRegistry


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


def bench(
    label: str, build: Callable[[], tuple[torch.nn.Module, tuple[str, ...]]], repeat: int, tmp: Path
) -> dict:
    import peft
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base, targets = build()
    model = AdapterModel(copy.deepcopy(base)).eval()
    model.add_adapter("task", LoraConfig(r=8, alpha=16, targets=targets, init="random"))
    registry = AdapterRegistry(tmp / f"reg-{label}")
    publish_ms = median_ms(lambda _i: registry.publish(model, adapter="task"), repeat)
    folder = registry.fetch("task@1")
    weights = folder / "adapter_model.safetensors"
    raw_ms = median_ms(lambda _i: load_file(str(weights)), repeat)

    target = AdapterModel(copy.deepcopy(base)).eval()

    def ours(i: int) -> None:
        load_adapter(target, folder, name=f"x{i + 1}")

    ours_ms = median_ms(ours, repeat)

    def via_registry(i: int) -> None:
        registry.load(target, "task@1", name=f"r{i + 1}")

    registry_ms = median_ms(via_registry, repeat)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder), adapter_name="first")
    peft_ms = median_ms(lambda i: peft_model.load_adapter(str(folder), adapter_name=f"x{i + 1}"), repeat)
    return {
        "shape": label,
        "file_kib": weights.stat().st_size / 1024,
        "publish_ms": publish_ms,
        "raw_read_ms": raw_ms,
        "ours_load_ms": ours_ms,
        "registry_load_ms": registry_ms,
        "peft_load_adapter_ms": peft_ms,
        "ours_vs_raw": ours_ms / raw_ms,
        "ours_vs_peft": peft_ms / ours_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_registry.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, build in (
            ("MiniLM-L6 (6 layers, r=8)", minilm_shape),
            ("SmolLM2-135M (30 layers, r=8)", smollm2_shape),
        ):
            rows.append(bench(label, build, args.repeat, Path(tmp)))
            print(f"  {label}: done", flush=True)
    print(
        "\n| shape | file KiB | publish ms | raw safetensors read ms | our load ms (verified) | registry.load ms | PEFT load_adapter ms | ours / raw | PEFT / ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['file_kib']:.0f} | {r['publish_ms']:.1f} | {r['raw_read_ms']:.2f} | "
            f"{r['ours_load_ms']:.1f} | {r['registry_load_ms']:.1f} | {r['peft_load_adapter_ms']:.1f} | "
            f"{r['ours_vs_raw']:.1f}x | {r['ours_vs_peft']:.2f}x |"
        )
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
