"""Real 2-process runs on CPU (gloo, launched with torch.distributed.run): under DDP and with the frozen
base sharded by FSDP2 (each process holds half of each base weight; the adapters stay whole), training
equals 1 process with the same global batch, only the main process writes, and what it saves loads into a
fresh model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import MOOD, TOPIC, minilm_tokenizer, task_csv, tiny
from safetensors.torch import load_file

from adapters_mtl import AdapterModel
from adapters_mtl.files.folder import load_adapter

WORKER = str(Path(__file__).parent / "distributed_worker.py")


def _run(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _held(stdout: str) -> list[dict]:
    rows = [json.loads(line[5:]) for line in stdout.splitlines() if line.startswith("HELD ")]
    return sorted(rows, key=lambda r: r["rank"])


def _one_and_two_processes(tmp_path, mode: str) -> tuple[str, str, dict, dict]:
    """Run the worker in 1 process (batch 8) and 2 (batch 4 each); their stdouts and saved tensors."""
    task_csv(tmp_path / "topic.csv", 160, *TOPIC, 1, filler=5)
    task_csv(tmp_path / "mood.csv", 120, *MOOD, 2, filler=5)
    one = _run(
        [sys.executable, WORKER, str(tmp_path / "one.safetensors"), "8", str(tmp_path), mode], tmp_path
    )
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = _run([*launch, WORKER, str(tmp_path / "two.safetensors"), "4", str(tmp_path), mode], tmp_path)
    assert one.count("saved by process") == 1 and two.count("saved by process 0 of 2") == 1
    assert "saved by process 1" not in two
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    assert any((a[k] != 0).any() for k in a if "lora_B" in k)  # training really moved the adapters
    assert sorted(p.name for p in (tmp_path / "run4" / "checkpoint").iterdir()) == [
        "state.safetensors",
        "trainer_state.json",
    ]
    return one, two, a, b


def test_two_process_ddp_matches_one_process(tmp_path):
    _, two, _, _ = _one_and_two_processes(tmp_path, "ddp")
    assert all(r["sharded"] == 0 for r in _held(two))  # plain DDP: every process holds the whole base


def test_two_process_fsdp_shards_the_base_and_matches_one_process(tmp_path):
    one, two, _, b = _one_and_two_processes(tmp_path, "fsdp")
    # one process: nothing sharded; two: every frozen base tensor split in halves
    (alone,) = _held(one)
    assert alone["sharded"] == 0 and alone["base_local"] == alone["base_full"]
    ranks = _held(two)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["query_full"] == [32, 32] and r["query_local"] == [16, 32]  # dim 0 split over 2 ranks
        assert r["sharded"] == r["base_tensors"] == 39, r["whole"]  # every frozen base tensor
        assert abs(r["base_local"] - r["base_full"] / 2) < 0.01 * r["base_full"]
        assert r["adapters"] == ["Parameter"]  # adapters whole (no DTensor): LoRA's stacked views intact
    # the trained adapters load into a fresh (unsharded) model and are what its routed path gathers
    from adapters_mtl.data.tasks import TaskSpec, load_task

    tok = minilm_tokenizer()
    tasks = {t: load_task(TaskSpec(name=t, source=str(tmp_path / f"{t}.csv"))) for t in ("topic", "mood")}
    model = AdapterModel(tiny("bert", vocab_size=tok.vocab_size, max_position_embeddings=64)).eval()
    for t in tasks:  # the folders the sharded run saved: card, fingerprint check, tensors
        load_adapter(model, tmp_path / f"two_{t}", name=t)
        for k, p in model.adapter_parameters(t).items():
            assert torch.equal(p, b[f"{t}.{k}"]), k
    inputs = dict(tok(["happy football river", "sad election stone"], return_tensors="pt", padding=True))
    inputs.pop("token_type_ids", None)
    with torch.no_grad():
        mixed = model(**inputs, adapters=["topic", "mood"])  # gathered from the stacked storage
        topic = model(**{k: v[:1] for k, v in inputs.items()}, adapters="topic")  # from the parameters
    torch.testing.assert_close(mixed.row_logits[0], topic.row_logits[0], atol=1e-5, rtol=0)
