"""Recipes: flat, commented YAML files → validated objects → a training run.

A recipe has the keys ``base`` (``minilm``, ``smollm2`` or a local model folder), ``tasks`` (a list of
TaskSpec fields), ``adapter`` (``lora:`` and/or ``prefix:`` config fields, used for every task; ``shared:``
LoRA fields of the shared adapter when ``train.sharing`` is ``shared`` or ``adversarial``, default the
task adapters' LoRA), ``train``
(TrainConfig fields) and ``registry`` (a registry root, ``default``, or ``null`` to skip publishing).
``key.sub=value`` overrides (YAML-parsed values) change any leaf, e.g. ``train.steps=5``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from .config import LoraConfig, PrefixConfig
from .tasks import TaskSpec

__all__ = ["RecipeError", "apply_overrides", "load_recipe", "run_recipe"]

TOP_KEYS = {"base", "tasks", "adapter", "train", "registry", "description"}


class RecipeError(ValueError):
    """A recipe that cannot run: names the key, what was received and the expected form."""


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (``tasks.0.limit=50`` indexes lists)."""
    out = json.loads(json.dumps(recipe))
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not key=value (e.g. train.steps=5)")
        key, raw = item.split("=", 1)
        node: Any = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        last = parts[-1]
        value = yaml.safe_load(raw)
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return out


def _build(cls, fields: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {e}") from e


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """Read, override and validate a recipe; returns ``{"raw", "base", "tasks", "adapter", "train", "registry"}``.

    Raises:
        RecipeError: every problem names its key and the expected form.
    """
    from .training.trainer import TrainConfig

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping with keys {sorted(TOP_KEYS)}")
    raw = apply_overrides(raw, list(overrides))
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise RecipeError(f"unknown top-level key(s) {unknown}; expected some of {sorted(TOP_KEYS)}")
    if not isinstance(raw.get("tasks"), list) or not raw["tasks"]:
        raise RecipeError("tasks: expected a non-empty list of tasks (each with name and source)")
    tasks = [_build(TaskSpec, dict(t), f"tasks[{i}]") for i, t in enumerate(raw["tasks"])]
    for spec in tasks:
        src = Path(spec.source)
        if src.suffix and not src.is_absolute() and not src.exists() and (path.parent / src).exists():
            object.__setattr__(spec, "source", str(path.parent / src))  # sources relative to the recipe
    adapter = raw.get("adapter") or {"lora": {}}
    unknown = sorted(set(adapter) - {"lora", "prefix", "shared"})
    if unknown:
        raise RecipeError(
            f"adapter: unknown key(s) {unknown}; expected 'lora' and/or 'prefix' (and 'shared')"
        )
    configs = []
    if "lora" in adapter:
        configs.append(_build(LoraConfig, dict(adapter["lora"] or {}), "adapter.lora"))
    if "prefix" in adapter:
        configs.append(_build(PrefixConfig, dict(adapter["prefix"] or {}), "adapter.prefix"))
    train = _build(TrainConfig, dict(raw.get("train") or {}), "train")
    shared = None
    if train.sharing != "none":
        fields = adapter.get("shared", adapter.get("lora"))
        if fields is None:
            raise RecipeError(
                f"train.sharing={train.sharing!r} needs a shared LoRA adapter: add adapter.shared "
                "(LoRA fields, e.g. {r: 8, targets: [query, value]}) or adapter.lora"
            )
        shared = _build(LoraConfig, dict(fields or {}), "adapter.shared")
        if any(c.method != "lora" for c in configs):
            raise RecipeError("train.sharing works with LoRA task adapters only; remove adapter.prefix")
    return {"raw": raw, "base": raw.get("base", "minilm"), "tasks": tasks, "adapter": configs, "train": train,
            "shared": shared, "registry": raw.get("registry", "default")}  # fmt: skip


def run_recipe(recipe: dict) -> dict:
    """Train every task's adapter, write ``metrics.csv``, ``training.png`` and ``results.json``, publish."""
    from .model import AdapterModel
    from .models import load_base
    from .registry import AdapterRegistry
    from .tasks import load_task
    from .training.trainer import MultiTaskTrainer

    try:
        base, tokenizer = load_base(recipe["base"])
    except ValueError as e:
        raise RecipeError(f"base: {e}") from e
    model = AdapterModel(base)
    if recipe.get("shared") is not None:
        model.add_adapter(recipe["train"].shared_adapter, recipe["shared"])
    tasks = {}
    for spec in recipe["tasks"]:
        tasks[spec.name] = load_task(spec)
        model.add_adapter(spec.name, list(recipe["adapter"]), head=tasks[spec.name].head_config())
    trainer = MultiTaskTrainer(model, tokenizer, tasks, recipe["train"])
    result = trainer.train()
    out = Path(recipe["train"].output_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for row in result["history"] for k in row}, key=lambda k: (k != "step", k))
    with open(out / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(result["history"])
    from .training.plots import plot_history

    plot = plot_history(
        result["history"], out / "training.png", title=f"{', '.join(tasks)} ({result['step']} steps)"
    )
    test = {t: trainer.evaluate(t, "test") for t in tasks}
    published = {}
    if recipe["registry"] is not None:
        registry = AdapterRegistry(None if recipe["registry"] == "default" else recipe["registry"])
        for t in tasks:
            published[t] = registry.publish(model, adapter=t, task=t, metrics=test[t], recipe=recipe["raw"])
    summary = {
        "steps": result["step"],
        "test": test,
        "best": result["best"],
        "published": published,
        "output_dir": str(out),
        "plot": str(plot),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
