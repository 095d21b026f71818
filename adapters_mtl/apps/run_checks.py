"""What a run checks before its model loads (data with every split non-empty, a usable output folder that
holds no other run, a reachable registry) and how it starts its output folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .recipe_yaml import RecipeError, report

__all__ = ["RUN_FILES", "check_before_model", "output_dir", "published_ok", "start_output"]

RUN_FILES = ("metrics.csv", "results.json", "checkpoint", "adapters", "training.png")


def output_dir(recipe: dict) -> Path:
    """``train.output_dir``, or for a compose recipe ``compose.output_dir`` (default runs/compose_<task>)."""
    compose = recipe.get("compose")
    if compose is not None:
        return Path(compose.get("output_dir", f"runs/compose_{recipe['tasks'][0].name}"))
    return Path(recipe["train"].output_dir)


def _folder_problem(path: Path, key: str) -> str | None:
    """Why ``path`` cannot be (created as) a writable folder, or None."""
    if path.exists() and not path.is_dir():
        return f"{key}: {path} is a file, not a folder; choose a folder path (it is created if missing)"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}: {path} cannot be created because {existing} is a file; choose another folder"
    try:  # the only honest test of writability (permissions, read-only mounts, quotas)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".amtl-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{key}: {path} is not writable ({e.strerror} in {existing}); choose a folder you can write to"
    return None


def _registry_problem(root: str) -> str | None:
    from ..registry import AdapterRegistry, default_root

    url = default_root() if root == "default" else root
    if "://" in url and not url.startswith("file://"):
        try:
            AdapterRegistry(url)
        except Exception as e:  # noqa: BLE001 - any failure to reach a remote store is the user's to fix
            return (
                f"registry: {url} cannot be opened ({type(e).__name__}: {e}); fix the URL or its credentials, "
                "or set registry: null"
            )
        return None
    problem = _folder_problem(Path(url.removeprefix("file://")).expanduser(), "registry")
    return problem and problem + ", or set registry: null to skip publishing"


def _has_run(out: Path) -> bool:
    return any((out / name).exists() for name in ("metrics.csv", "results.json", "checkpoint"))


def check_before_model(recipe: dict, resume: bool, overwrite: bool) -> dict:
    """Everything that can fail before the model loads: data (every split non-empty), output folder,
    existing run, registry. Returns the loaded tasks; raises one RecipeError listing every problem."""
    from ..data.tasks import load_task

    problems: list[str] = []
    compose = recipe.get("compose")
    needed = ("train", "test") if compose is not None else ("train", "validation", "test")
    tasks = {}
    for i, spec in enumerate(recipe["tasks"]):
        try:
            data = load_task(spec)
        except (FileNotFoundError, KeyError, ValueError, OSError) as e:
            problems.append(
                f"tasks[{i}] ({spec.name}): {e.args[0] if isinstance(e, KeyError) and e.args else e}"
            )
            continue
        sizes = {k: len(v) for k, v in data.splits.items()}
        for split in needed:
            if sizes[split] == 0:
                problems.append(
                    f"tasks[{i}] ({spec.name}): the {split} split is empty ({sum(sizes.values())} rows split "
                    f"{list(spec.splits)} gives train {sizes['train']}, validation {sizes['validation']}, test "
                    f"{sizes['test']}); give {split} a larger share in tasks.{i}.splits or use more rows (tasks.{i}.limit)"
                )
        tasks[spec.name] = data
    out = output_dir(recipe)
    key = "compose.output_dir" if compose is not None else "train.output_dir"
    problem = _folder_problem(out, key)
    problems += [problem] if problem else []
    if resume and overwrite:
        problems.append(
            "--resume continues the run in output_dir and --overwrite replaces it: pass one of them"
        )
    elif resume and compose is not None:
        problems.append("--resume: a compose recipe has no training to resume; run it again without --resume")
    elif resume and not any(
        (out / c / "trainer_state.json").is_file() for c in ("checkpoint", ".checkpoint.old")
    ):
        problems.append(
            f"--resume: no checkpoint in {out / 'checkpoint'} (checkpoints are written every train.checkpoint_every "
            "steps and on Ctrl-C); run without --resume to start again"
        )
    elif not (resume or overwrite) and problem is None and _has_run(out):
        problems.append(
            f"{key}: {out} already holds a run ({', '.join(n for n in RUN_FILES if (out / n).exists())}); pass "
            f"--resume to continue it from its checkpoint or --overwrite to replace it, or choose another {key}"
        )
    if compose is not None:
        problems += _compose_registry_problems(recipe)
    elif recipe["registry"] is not None and published_ok(recipe, recipe["adapters"]) is None:
        problem = _registry_problem(recipe["registry"])
        problems += [problem] if problem else []
    if problems:
        raise RecipeError(report(problems))
    return tasks


def _compose_registry_problems(recipe: dict) -> list[str]:
    from ..registry import AdapterRegistry

    try:
        registry = AdapterRegistry(None if recipe["registry"] in (None, "default") else recipe["registry"])
    except Exception as e:  # noqa: BLE001
        return [f"registry: {recipe['registry']} cannot be opened ({type(e).__name__}: {e})"]
    problems = []
    for ref in recipe["compose"]["adapters"]:
        try:
            registry.resolve(str(ref))
        except (KeyError, ValueError) as e:
            problems.append(
                f"compose.adapters: {e}; publish it first (e.g. run recipes/single_task_lora.yaml)"
            )
    return problems


def start_output(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and os.environ.get("RANK", "0") == "0":  # one process clears (under accelerate launch)
        # only what a run writes: the folder may hold other things (a registry, logs)
        for name in (*RUN_FILES, ".checkpoint.tmp", ".checkpoint.old"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def published_ok(recipe: dict, adapters: dict) -> str | None:
    """Why nothing can be published (None when it can)."""
    if recipe["train"].unfreeze != "none":
        return "the base model was fine-tuned too (train.unfreeze): its adapters only work on that base"
    if any(not configs for configs in adapters.values()):
        return "head-only adapters (adapter: none) have no adapter weights to publish"
    return None
