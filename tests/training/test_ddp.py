"""A real 2-process DDP run on CPU (gloo, launched with torch.distributed.run) equals 1 process with the
same global batch, and only the main process writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import MOOD, TOPIC, task_csv
from safetensors.torch import load_file

WORKER = str(Path(__file__).parent / "ddp_worker.py")


def _run(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_process_ddp_matches_one_process(tmp_path):
    task_csv(tmp_path / "topic.csv", 160, *TOPIC, 1, filler=5)
    task_csv(tmp_path / "mood.csv", 120, *MOOD, 2, filler=5)
    one = _run([sys.executable, WORKER, str(tmp_path / "one.safetensors"), "8", str(tmp_path)], tmp_path)
    two = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            WORKER,
            str(tmp_path / "two.safetensors"),
            "4",
            str(tmp_path),
        ],
        tmp_path,
    )
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
