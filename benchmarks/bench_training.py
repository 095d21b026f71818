"""Training benchmark: a joint multi-task step (mixed batch routed per row) vs a single-task PEFT LoRA step.

Every variant runs the same step on the same batch (B rows × T tokens) and the same base shape
(MiniLM-L6: BERT, 6 layers, hidden 384, random weights from its config; LoRA r=8 on query+value; a linear
classification head per task), with an Accelerate loop: forward, cross-entropy, ``accelerator.backward``,
AdamW step.

  peft single      PEFT ``get_peft_model`` + one head, a plain Accelerate loop (the reference)
  ours single      AdapterModel, one adapter for every row
  full FT          the same base and head with every weight trained (no adapter): what a LoRA step saves
  ours joint-4     4 task adapters + heads, rows assigned round-robin, one routed call (the trainer's step)
  ours shared+4    as joint-4 with a shared adapter stacked under each task adapter (hierarchical sharing)
  ours joint-4 ckpt  joint-4 with routed activation checkpointing (``activation_checkpointing_enable``):
                   the memory it saves and the time it costs

Each variant runs in its own process so its peak memory (CUDA: max allocated; CPU: peak RSS) is its own;
variants run interleaved ``--repeat`` times and the fastest run of each is reported.
A second table checks that N task adapters cost base + N × adapter (no base copies): exact byte counts of
every parameter storage of a model holding N adapters, as grown (the stacked tensors double their capacity)
and after ``AdapterModel.compact()``; slot 0 (no adapter) is one adapter's worth of zeros. Prints markdown tables and writes JSON. Usage:
  python benchmarks/bench_training.py [--steps 20] [--batch 32] [--seq 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("peft single", "ours single", "full FT", "ours joint-4", "ours shared+4", "ours joint-4 ckpt")
# issue 15: a single-adapter step >= 1.05x PEFT's throughput; a LoRA step <= 0.75x a full fine-tuning step
GOALS = {"single_vs_peft": 1.05, "lora_vs_full_step": 0.75}
TARGETS = ("query", "value")


def minilm_shape() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        attn_implementation="sdpa",
    )
    return BertModel(cfg)


def run_variant(variant: str, steps: int, B: int, T: int) -> dict:
    """One variant in this process: tokens/s and peak memory."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    base = minilm_shape()
    input_ids = torch.randint(1000, 30000, (B, T))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones(B, T, dtype=torch.long)}
    labels = torch.randint(0, 3, (B,))
    if variant == "peft single":
        import peft

        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS)))
        head = torch.nn.Linear(384, 3)
        module = torch.nn.ModuleDict({"model": model, "head": head})

        def loss_fn():
            hidden = module["model"](**batch).last_hidden_state[:, 0]
            return torch.nn.functional.cross_entropy(module["head"](hidden), labels)
    elif variant == "full FT":
        head = torch.nn.Linear(384, 3)
        module = torch.nn.ModuleDict({"model": base, "head": head})

        def loss_fn():
            hidden = module["model"](**batch).last_hidden_state[:, 0]
            return torch.nn.functional.cross_entropy(module["head"](hidden), labels)
    else:
        from adapters_mtl import AdapterModel, HeadConfig, LoraConfig

        module = AdapterModel(base)
        n = 1 if variant == "ours single" else 4
        tasks = [f"task{i}" for i in range(n)]
        for t in tasks:
            module.add_adapter(
                t, LoraConfig(r=8, alpha=16, targets=TARGETS), head=HeadConfig(num_labels=3, pooling="cls")
            )
        if variant == "ours shared+4":
            module.add_adapter("shared", LoraConfig(r=8, alpha=16, targets=TARGETS))
        rows = [tasks[i % n] for i in range(B)]
        if variant == "ours joint-4 ckpt":
            module.activation_checkpointing_enable()
        if variant == "ours shared+4":
            rows = [("shared", t) for t in rows]

        def loss_fn():
            out = module(**batch, adapters=rows)
            return sum(
                torch.nn.functional.cross_entropy(h.logits, labels.index_select(0, h.rows))
                for h in out.heads.values()
            )

    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    module, opt = acc.prepare(module, opt)
    batch = {k: v.to(acc.device) for k, v in batch.items()}
    labels = labels.to(acc.device)
    module.train()

    def step():
        loss = loss_fn()
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "variant": variant,
        "tokens_per_s": B * T * steps / seconds,
        "step_ms": seconds / steps * 1e3,
        "peak_mib": peak,
        "trainable": sum(p.numel() for p in params),
    }


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct parameter storage (views into one stacked tensor count once)."""
    seen, total = set(), 0
    for p in module.parameters():
        s = p.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def memory_scaling(counts: tuple[int, ...] = (1, 4, 16, 64)) -> list[dict]:
    from adapters_mtl import AdapterModel, HeadConfig, LoraConfig

    torch.manual_seed(0)
    base = minilm_shape()
    base_bytes = storage_bytes(base)
    model = AdapterModel(base)
    out, have = [], 0
    for n in counts:
        while have < n:
            model.add_adapter(f"t{have}", LoraConfig(r=8, targets=TARGETS), head=HeadConfig(num_labels=3))
            have += 1
        adapter_bytes = sum(p.numel() * p.element_size() for p in model.adapter_parameters("t0").values())
        grown = storage_bytes(model)
        model.compact()
        total = storage_bytes(model)
        predicted = base_bytes + n * adapter_bytes
        out.append(
            {
                "adapters": n,
                "base_mib": base_bytes / 2**20,
                "adapter_kib": adapter_bytes / 2**10,
                "grown_mib": grown / 2**20,
                "total_mib": total / 2**20,
                "predicted_mib": predicted / 2**20,
                "ratio": total / predicted,
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (interleaved; best kept)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_training.json")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.batch, args.seq)))
        return
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeat):  # variants interleaved, best run kept: machine noise hits all alike
        for variant in VARIANTS:
            sizes = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
            cmd = [sys.executable, __file__, "--variant", variant, *sizes]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [max(runs[v], key=lambda r: r["tokens_per_s"]) for v in VARIANTS]
    ref = rows[0]
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"
    )
    print(f"\n## Training step, MiniLM-L6 shape, B={args.batch} T={args.seq}, LoRA r=8 q+v, {device}\n")
    print("| variant | tokens/s | × PEFT | step ms | peak memory MiB | trainable params |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        r["vs_peft"] = r["tokens_per_s"] / ref["tokens_per_s"]
        print(
            f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['vs_peft']:.2f} | {r['step_ms']:.1f} | "
            f"{r['peak_mib']:.0f} | {r['trainable']:,} |"
        )
    by_name = {r["variant"]: r for r in rows}
    single_vs_peft = by_name["ours single"]["vs_peft"]
    lora_vs_full = by_name["ours single"]["step_ms"] / by_name["full FT"]["step_ms"]
    goals = [
        {
            "goal": "training step: ours single / PEFT single throughput",
            "measured": round(single_vs_peft, 3),
            "target": f">= {GOALS['single_vs_peft']}",
            "met": single_vs_peft >= GOALS["single_vs_peft"],
        },
        {
            "goal": "training step: LoRA step / full fine-tuning step time",
            "measured": round(lora_vs_full, 3),
            "target": f"<= {GOALS['lora_vs_full_step']}",
            "met": lora_vs_full <= GOALS["lora_vs_full_step"],
        },
    ]
    print("\n| goal | measured | target | met |\n|---|---:|---|---|")
    for g in goals:
        print(f"| {g['goal']} | {g['measured']} | {g['target']} | {'yes' if g['met'] else 'NO'} |")
    scaling = memory_scaling()
    print("\n## Parameter memory with N task adapters (+ heads): base + N × adapter?\n")
    print(
        "| N | base MiB | adapter KiB | as grown MiB | after compact() MiB | base + N×adapter MiB | ratio |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for s in scaling:
        print(
            f"| {s['adapters']} | {s['base_mib']:.1f} | {s['adapter_kib']:.1f} | {s['grown_mib']:.2f} | "
            f"{s['total_mib']:.2f} | {s['predicted_mib']:.2f} | {s['ratio']:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "torch": torch.__version__,
        "steps_table": rows,
        "memory_scaling": scaling,
        "goals": goals,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
