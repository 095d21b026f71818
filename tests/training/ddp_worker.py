"""Worker of test_ddp.py: trains two tasks on a tiny BERT; the main process writes the adapters.

Run: python -m torch.distributed.run --nproc_per_node N tests/training/ddp_worker.py OUT BATCH TMPDIR
(OUT: the .safetensors file written)
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: helpers.py
from helpers import minilm_tokenizer, task_model, tiny  # noqa: E402

from adapters_mtl.data.tasks import TaskSpec, load_task  # noqa: E402
from adapters_mtl.training import MultiTaskTrainer, TrainConfig  # noqa: E402


def main() -> None:
    out, batch_size, tmp = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    tok = minilm_tokenizer()
    tasks = {t: load_task(TaskSpec(name=t, source=str(tmp / f"{t}.csv"))) for t in ("topic", "mood")}
    model = task_model(tiny("bert", vocab_size=tok.vocab_size, max_position_embeddings=64), tasks)
    for name in tasks:
        model.heads[name].dropout.p = 0.0  # compare gradient averaging, not dropout streams
    cfg = TrainConfig(
        steps=6,
        batch_size=batch_size,
        lr=1e-2,
        eval_every=100,
        max_grad_norm=None,
        checkpoint_every=3,
        output_dir=str(tmp / f"run{batch_size}"),
        seed=0,
    )
    trainer = MultiTaskTrainer(model, tok, tasks, cfg)
    trainer.train()
    if trainer.acc.is_main_process:
        tensors = {
            f"{t}.{k}": p.detach().contiguous().clone()
            for t in tasks
            for k, p in model.adapter_parameters(t).items()
        }
        save_file(tensors, out)
        print(f"saved by process {trainer.acc.process_index} of {trainer.acc.num_processes}", flush=True)


if __name__ == "__main__":
    main()
