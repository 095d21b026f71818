"""Training that keeps its work and refuses bad recipes early: every value checked before the model loads
(all problems at once), safe YAML, live metrics, adapters saved before test evaluation and publishing,
--resume / --overwrite, and Ctrl-C writing a checkpoint — through the Python API and the real CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import MOOD, TOPIC, minilm_tokenizer, task_csv, tiny
from safetensors.torch import load_file

from adapters_mtl.apps.cli import main
from adapters_mtl.apps.recipe import RecipeError, RunError, load_recipe, run_recipe

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny BERT folder (real MiniLM tokenizer) and two small CSV tasks."""
    root = tmp_path_factory.mktemp("safety")
    tok = minilm_tokenizer()
    tiny("bert", vocab_size=tok.vocab_size, max_position_embeddings=64).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return {
        "base": root / "base",
        "topic": task_csv(root / "a.csv", 60, *TOPIC, 1, filler=4),
        "mood": task_csv(root / "b.csv", 60, *MOOD, 2, filler=4),
    }


def _recipe(files, tmp_path: Path, **train) -> Path:
    recipe = {
        "base": str(files["base"]),
        "tasks": [
            {"name": "topic", "source": files["topic"], "max_length": 16},
            {"name": "mood", "source": files["mood"], "max_length": 16},
        ],
        "adapter": {"lora": {"r": 2, "alpha": 4, "targets": ["query", "value"]}},
        "train": {
            "steps": 4,
            "batch_size": 8,
            "lr": 0.01,
            "batching": "mixed",
            "eval_every": 2,
            "output_dir": str(tmp_path / "run"),
            **train,
        },
        "registry": str(tmp_path / "reg"),
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything loads a base model (the checks must come first)."""

    def refuse(*_a, **_k):
        raise AssertionError("the base model was loaded before the recipe was checked")

    monkeypatch.setattr("adapters_mtl.data.bases.load_base", refuse)


# ----------------------------------------------------------------------------- reading and values
def test_billion_laughs_is_refused_in_well_under_a_second(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    path = tmp_path / "lol.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1000
    started = time.perf_counter()
    with pytest.raises(RecipeError, match="expand to more than 100,000 values"):
        load_recipe(path)
    assert time.perf_counter() - started < 0.5
    big = tmp_path / "big.yaml"
    big.write_text("description: " + "x" * 1_100_000)
    with pytest.raises(RecipeError, match="limited to 1,000,000"):
        load_recipe(big)


def test_numbers_are_yaml_1_2_and_a_quoted_number_is_explained(files, tmp_path):
    path = _recipe(files, tmp_path, lr=1e-3, mixed_precision="no")
    text = (
        path.read_text()
        .replace("lr: 0.001", "lr: 1e-3")
        .replace("mixed_precision: 'no'", "mixed_precision: no")
    )
    path.write_text(text)
    assert "lr: 1e-3" in text and "mixed_precision: no\n" in text  # YAML 1.1 reads a string and false
    loaded = load_recipe(path, ["train.weight_decay=1e-2", "train.base_lr=5E-5"])
    assert loaded["train"].lr == 1e-3 and loaded["train"].weight_decay == 0.01
    assert loaded["train"].base_lr == 5e-5 and loaded["train"].mixed_precision == "no"
    assert loaded["train"].steps == 4 and isinstance(loaded["train"].steps, int)
    with pytest.raises(
        RecipeError,
        match=r"train\.lr: expected a number, got '1e-3' \(a string\); write the number without quotes",
    ):
        load_recipe(path, ["train.lr='1e-3'"])


def test_bad_values_are_all_reported_at_once_naming_their_keys(files, tmp_path):
    path = _recipe(files, tmp_path)
    overrides = ["tasks.0.max_length=-5", "tasks.1.max_length=0", "train.patience=-1", "train.lr=-1"]
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides)
    msg = str(e.value)
    assert msg.startswith("3 problems:")  # one line per section: tasks[0], tasks[1], train
    assert "tasks[0]: invalid task 'topic': max_length must be a positive int" in msg and "got -5" in msg
    assert "tasks[1]: invalid task 'mood': max_length must be a positive int" in msg and "got 0" in msg
    assert (
        "patience must be a positive int (evaluations without improvement before a task stops) or null" in msg
    )
    assert "lr must be a positive number (e.g. 0.001), got -1" in msg


def test_overrides_into_a_scalar_or_past_a_list_name_the_override(files, tmp_path):
    path = _recipe(files, tmp_path)
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["train.steps.x=1", "tasks.7.limit=3", "tasks.first.limit=3", "nokey"])
    msg = str(e.value)
    assert (
        "override 'train.steps.x=1': train.steps is 4 (not a mapping or a list), so it has no key 'x'" in msg
    )
    assert "override 'tasks.7.limit=3': tasks is a list of 2 (indices 0 to 1), so '7' is not in it" in msg
    assert "override 'tasks.first.limit=3'" in msg and "override 'nokey' is not key=value" in msg


def test_cli_prints_one_error_line_per_problem_without_a_traceback(files, tmp_path, capsys):
    path = _recipe(files, tmp_path)
    assert main(["train", str(path), "tasks.0.max_length=-5", "train.steps.x=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adapters-mtl: error: ") and "Traceback" not in err and "train.steps.x=1" in err


# ----------------------------------------------------------------------------- before the model loads
@pytest.mark.usefixtures("no_model")
def test_empty_test_split_fails_before_the_model_loads(files, tmp_path):
    path = _recipe(files, tmp_path)
    started = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        run_recipe(load_recipe(path, ["tasks.1.splits=[0.9, 0.1, 0.0]"]))
    assert time.perf_counter() - started < 10
    assert (
        "tasks[1] (mood): the test split is empty (60 rows split [0.9, 0.1, 0.0] gives train 54, validation 6, test 0)"
        in str(e.value)
    )
    assert "tasks.1.splits" in str(e.value) and not (tmp_path / "run").exists()


@pytest.mark.usefixtures("no_model")
def test_unusable_output_dir_and_registry_are_reported_together_before_the_model(files, tmp_path):
    path = _recipe(files, tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    recipe = load_recipe(
        path, [f"train.output_dir={tmp_path / 'a_file'}", f"registry={tmp_path / 'a_file' / 'reg'}"]
    )
    with pytest.raises(RecipeError) as e:
        run_recipe(recipe)
    msg = str(e.value)
    assert msg.startswith("2 problems:")
    assert f"train.output_dir: {tmp_path / 'a_file'} is a file, not a folder" in msg
    assert (
        f"registry: {tmp_path / 'a_file' / 'reg'} cannot be created because {tmp_path / 'a_file'} is a file"
        in msg
    )


def test_an_existing_run_is_kept_unless_resume_or_overwrite(files, tmp_path, capsys):
    path = _recipe(files, tmp_path, steps=2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("step\n1\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (metrics.csv)" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "run" / "metrics.csv").read_text() == "step\n1\n"
    assert main(["train", str(path), "--resume"]) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert main(["train", str(path), "--overwrite", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and set(summary["published"]) == {"topic", "mood"}
    with pytest.raises(SystemExit):
        main(["train", str(path), "--overwrite", "--resume"])


# ----------------------------------------------------------------------------- keeping the work
def test_publish_failure_keeps_adapters_results_and_says_how_to_publish(files, tmp_path, monkeypatch, capsys):
    from adapters_mtl.registry import AdapterRegistry

    path = _recipe(files, tmp_path, steps=3)

    def broken(_self, *_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AdapterRegistry, "publish", broken)
    with pytest.raises(RunError) as e:
        run_recipe(load_recipe(path))
    run = tmp_path / "run"
    msg = str(e.value)
    assert "No space left on device" in msg and f"results are kept in {run}" in msg
    command = f"adapters-mtl registry --root {tmp_path / 'reg'} publish {run / 'adapters' / 'topic'}"
    assert command in msg
    results = json.loads((run / "results.json").read_text())
    assert set(results["test"]) == {"topic", "mood"} and "No space left" in results["publish_error"]
    card = json.loads((run / "adapters" / "topic" / "adapter_card.json").read_text())
    assert card["metrics"]["accuracy"] == results["test"]["topic"]["accuracy"]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    monkeypatch.undo()
    assert main(command.split()[1:4] + ["--json"] + command.split()[4:]) == 0  # the printed command works
    assert json.loads(capsys.readouterr().out) == {"ref": "topic@1"}


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "adapters_mtl.apps.cli", "train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _adapters(run: Path) -> dict[str, torch.Tensor]:
    return {
        f"{t}/{k}": v
        for t in ("topic", "mood")
        for k, v in load_file(run / "adapters" / t / "adapter_model.safetensors").items()
    }


def test_killed_cli_run_resumed_ends_with_the_adapters_of_an_uninterrupted_one(files, tmp_path, capsys):
    settings = ["train.steps=8", "train.checkpoint_every=3", "registry=null"]
    whole = _cli(str(_recipe(files, tmp_path / "a")), *settings)
    path = _recipe(files, tmp_path / "b")
    killed = _cli(str(path), *settings, env={"ADAPTERS_MTL_CRASH_AT": "step:5"})
    for proc in (whole, killed):
        proc.wait(timeout=240)
    assert whole.returncode == 0, whole.stderr.read()
    assert killed.returncode == 17, killed.stderr.read()
    run = tmp_path / "b" / "run"
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    assert [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open())] == [1, 2, 3, 4, 5]  # live
    assert not (run / "results.json").exists()
    assert main(["train", str(path), *settings]) == 2  # a plain re-run must not overwrite the checkpoint
    assert "--resume" in capsys.readouterr().err
    resumed = _cli(str(path), *settings, "--resume")
    resumed.wait(timeout=240)
    assert resumed.returncode == 0, resumed.stderr.read()
    want, got = _adapters(tmp_path / "a" / "run"), _adapters(run)
    assert want.keys() == got.keys() and len(want) > 4
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
    rows = lambda p: list(csv.DictReader((p / "metrics.csv").open()))  # noqa: E731
    losses = lambda p: [float(r["loss/topic"] or "nan") for r in rows(p)]  # noqa: E731
    assert losses(run) == pytest.approx(losses(tmp_path / "a" / "run"), abs=1e-6, nan_ok=True)


def test_ctrl_c_writes_a_checkpoint_and_exits_130_with_the_resume_command(files, tmp_path, capsys):
    path = _recipe(files, tmp_path, steps=100_000, eval_every=1000)
    proc = _cli(str(path), "registry=null")
    metrics = tmp_path / "run" / "metrics.csv"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # header + 2 live rows
        assert proc.poll() is None and time.monotonic() < deadline, (
            proc.stderr.read() if proc.poll() else "timeout"
        )
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("adapters-mtl: interrupted after step ") and "checkpoint in" in last
    assert last.endswith(f"adapters-mtl train {path} registry=null --resume")
    step = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert f"interrupted after step {step};" in last and step >= 2
    # the printed command continues it (here to a nearby end)
    assert main(["train", str(path), "registry=null", f"train.steps={step + 2}", "--resume", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == step + 2 and Path(summary["adapters"]["topic"]).is_dir()


def test_train_help_documents_resume_overwrite_and_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "--resume" in out and "--overwrite" in out
    assert "130 interrupted" in out and "adapters-mtl registry publish FOLDER" in out
