"""Worker of test_distributed.py: trains two tasks on a tiny BERT under DDP or, with MODE fsdp, with the
frozen base sharded by FSDP2 (in one process: neither); prints what each process holds of the base and
the main process writes the adapters (tensors, and each adapter as a folder with ``save_adapter``).

Run: python -m torch.distributed.run --nproc_per_node N tests/training/distributed_worker.py OUT BATCH TMPDIR MODE
(OUT: the .safetensors file written; the folders go next to it; MODE: ddp | fsdp)
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: helpers.py
from helpers import minilm_tokenizer, task_model, tiny  # noqa: E402

from adapters_mtl.data.tasks import TaskSpec, load_task  # noqa: E402
from adapters_mtl.files.folder import save_adapter  # noqa: E402
from adapters_mtl.training import MultiTaskTrainer, TrainConfig  # noqa: E402


def main() -> None:
    out, batch_size, tmp, mode = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    fsdp = mode == "fsdp"
    tok = minilm_tokenizer()
    tasks = {t: load_task(TaskSpec(name=t, source=str(tmp / f"{t}.csv"))) for t in ("topic", "mood")}
    model = task_model(tiny("bert", vocab_size=tok.vocab_size, max_position_embeddings=64), tasks)
    for name in tasks:
        model.heads[name].dropout.p = 0.0  # compare gradient averaging, not dropout streams
    cfg = TrainConfig(
        steps=6,
        batch_size=batch_size,
        lr=1e-2,
        eval_every=3 if fsdp else 100,  # with fsdp, evaluation runs on the sharded model between steps
        max_grad_norm=1.0 if fsdp else None,  # clipped after DDP's averaging: the same as one process
        checkpoint_every=3,
        output_dir=str(tmp / f"run{batch_size}"),
        seed=0,
        fsdp=fsdp,  # sharded only when there are several processes
    )
    trainer = MultiTaskTrainer(model, tok, tasks, cfg)
    trainer.train()
    weight = model.base.encoder.layer[0].attention.self.query.base_layer.weight  # a sharded base weight
    local = getattr(weight, "to_local", lambda: weight)()
    base = [p for n, p in model.base.named_parameters() if not p.requires_grad]
    held = {
        "rank": trainer.acc.process_index,
        "query_full": list(weight.shape),
        "query_local": list(local.shape),
        "base_full": sum(p.numel() for p in base),
        "base_local": sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in base),
        "sharded": sum(type(p).__name__ == "DTensor" for p in base),
        "whole": [n for n, p in model.base.named_parameters() if type(p).__name__ != "DTensor"],
        "base_tensors": len(base),
        "adapters": sorted({type(p).__name__ for t in tasks for p in model.adapter_parameters(t).values()}),
    }
    print("HELD " + json.dumps(held), flush=True)
    if trainer.acc.is_main_process:
        tensors = {
            f"{t}.{k}": p.detach().contiguous().clone()
            for t in tasks
            for k, p in model.adapter_parameters(t).items()
        }
        save_file(tensors, out)
        for t in tasks:  # published from the sharded model: its base fingerprint was pinned before sharding
            save_adapter(model, t, Path(out).with_name(f"{Path(out).stem}_{t}"))
        print(f"saved by process {trainer.acc.process_index} of {trainer.acc.num_processes}", flush=True)


if __name__ == "__main__":
    main()
