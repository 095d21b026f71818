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

import torch
import yaml

from .config import LoraConfig, PrefixConfig
from .tasks import TaskSpec

__all__ = ["RecipeError", "apply_overrides", "load_recipe", "run_recipe"]

TOP_KEYS = {"base", "tasks", "adapter", "train", "registry", "description", "compose"}
COMPOSE_KEYS = {"adapters", "shots", "budget", "seed", "publish", "output_dir"}


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


def _adapter_configs(adapter, where: str) -> list:
    """``{lora: {...}, prefix: {...}}`` → native configs; ``none`` → [] (head-only adapters)."""
    if adapter in ("none", None, "null") or adapter == {}:
        return []
    if not isinstance(adapter, dict):
        raise RecipeError(
            f"{where}: expected a mapping with 'lora' and/or 'prefix', or 'none'; got {adapter!r}"
        )
    unknown = sorted(set(adapter) - {"lora", "prefix", "shared"})
    if unknown:
        raise RecipeError(
            f"{where}: unknown key(s) {unknown}; expected 'lora' and/or 'prefix' (and 'shared')"
        )
    configs = []
    if "lora" in adapter:
        configs.append(_build(LoraConfig, dict(adapter["lora"] or {}), f"{where}.lora"))
    if "prefix" in adapter:
        configs.append(_build(PrefixConfig, dict(adapter["prefix"] or {}), f"{where}.prefix"))
    return configs


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """Read, override and validate a recipe.

    Returns ``{"raw", "base", "tasks", "adapters" (per task), "train", "shared", "compose", "registry"}``.

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
    default_adapter = raw.get("adapter", {"lora": {}})
    default = _adapter_configs(default_adapter, "adapter")
    tasks, adapters = [], {}
    for i, entry in enumerate(raw["tasks"]):
        if not isinstance(entry, dict):
            raise RecipeError(f"tasks[{i}]: expected a mapping with name and source, got {entry!r}")
        entry = dict(entry)
        own = entry.pop("adapter", None)
        spec = _build(TaskSpec, entry, f"tasks[{i}]")
        src = Path(spec.source)
        if src.suffix and not src.is_absolute() and not src.exists() and (path.parent / src).exists():
            object.__setattr__(spec, "source", str(path.parent / src))  # sources relative to the recipe
        tasks.append(spec)
        adapters[spec.name] = _adapter_configs(own, f"tasks[{i}].adapter") if own is not None else default
    train = _build(TrainConfig, dict(raw.get("train") or {}), "train")
    shared = None
    if train.sharing != "none":
        fields = (default_adapter or {}).get("shared", (default_adapter or {}).get("lora")) if isinstance(default_adapter, dict) else None  # fmt: skip
        if fields is None:
            raise RecipeError(
                f"train.sharing={train.sharing!r} needs a shared LoRA adapter: add adapter.shared "
                "(LoRA fields, e.g. {r: 8, targets: [query, value]}) or adapter.lora"
            )
        shared = _build(LoraConfig, dict(fields or {}), "adapter.shared")
        if any(c.method != "lora" for configs in adapters.values() for c in configs):
            raise RecipeError("train.sharing works with LoRA task adapters only; remove the prefix configs")
    compose = raw.get("compose")
    if compose is not None:
        compose = dict(compose)
        unknown = sorted(set(compose) - COMPOSE_KEYS)
        if unknown or not compose.get("adapters"):
            raise RecipeError(
                f"compose: expected keys {sorted(COMPOSE_KEYS)} with a non-empty 'adapters' list; got {sorted(compose)}"
            )
    return {"raw": raw, "base": raw.get("base", "minilm"), "tasks": tasks, "adapters": adapters, "train": train,
            "shared": shared, "compose": compose, "registry": raw.get("registry", "default")}  # fmt: skip


def _published_ok(recipe: dict, adapters: dict) -> str | None:
    """Why nothing can be published (None when it can)."""
    if recipe["train"].unfreeze != "none":
        return "the base model was fine-tuned too (train.unfreeze): its adapters only work on that base"
    if any(not configs for configs in adapters.values()):
        return "head-only adapters (adapter: none) have no adapter weights to publish"
    return None


def run_recipe(recipe: dict) -> dict:
    """Train every task's adapter (or, with ``compose:``, compose published ones), write ``metrics.csv``,
    ``training.png`` and ``results.json`` (test metrics with per-class reports; sample generations of
    causal-LM tasks, routed in one batch) and publish to the registry."""
    from .model import AdapterModel
    from .models import load_base
    from .registry import AdapterRegistry
    from .tasks import load_task
    from .training.trainer import MultiTaskTrainer

    try:
        base, tokenizer = load_base(recipe["base"])
    except ValueError as e:
        raise RecipeError(f"base: {e}") from e
    if recipe.get("compose") is not None:
        return _run_compose(recipe, base, tokenizer)
    model = AdapterModel(base)
    if recipe.get("shared") is not None:
        model.add_adapter(recipe["train"].shared_adapter, recipe["shared"])
    tasks = {}
    for spec in recipe["tasks"]:
        tasks[spec.name] = load_task(spec)
        model.add_adapter(spec.name, list(recipe["adapters"][spec.name]), head=tasks[spec.name].head_config())
    owners = [*tasks, *([recipe["train"].shared_adapter] if recipe.get("shared") is not None else [])]
    trainable = sum(p.numel() for t in owners for p in model.adapter_parameters(t).values())
    trainer = MultiTaskTrainer(model, tokenizer, tasks, recipe["train"])
    import time

    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
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
    test = {t: trainer.evaluate(t, "test", report=True) for t in tasks}
    published, skipped = {}, None
    if recipe["registry"] is not None:
        skipped = _published_ok(recipe, recipe["adapters"])
        if skipped is None:
            registry = AdapterRegistry(None if recipe["registry"] == "default" else recipe["registry"])
            for t in tasks:
                metrics = {k: v for k, v in test[t].items() if not isinstance(v, dict)}
                published[t] = registry.publish(
                    model, adapter=t, task=t, metrics=metrics, recipe=recipe["raw"]
                )
    base_params = sum(p.numel() for n, p in model.base.named_parameters() if ".lora_" not in n)
    summary = {
        "steps": result["step"],
        "seconds": seconds,
        "trainable_params": trainable
        + sum(p.numel() for k, p in trainer.named.items() if k.startswith("base::")),
        "base_params": base_params,
        "test": test,
        "best": result["best"],
        "samples": _samples(model, tokenizer, tasks),
        "published": published,
        "not_published": skipped,
        "output_dir": str(out),
        "plot": str(plot),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


@torch.no_grad()
def _samples(model, tokenizer, tasks: dict, per_task: int = 3, max_new_tokens: int = 24) -> list[dict]:
    """A few test prompts of every causal-LM task, generated in ONE batch routed per row to each task."""
    rows = [(t, text, data.target(label)) for t, data in tasks.items() if data.generative
            for text, label in list(zip(data.splits["test"]["text"], data.splits["test"]["label"], strict=True))[:per_task]]  # fmt: skip
    if not rows:
        return []
    from .training.objectives import pad

    prompts = [{"input_ids": tasks[t].causal_ids(tokenizer, text, None)[0]} for t, text, _ in rows]
    device = next(model.base.parameters()).device
    enc = {
        k: v.to(device) for k, v in pad(tokenizer, prompts, "left").items()
    }  # generation continues rightwards
    model.eval()
    out = model.generate(**enc, adapters=[t for t, _, _ in rows], max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [{"task": t, "prompt": text[:200], "target": target.strip(), "output": o.strip()}
            for (t, text, target), o in zip(rows, texts, strict=True)]  # fmt: skip


def _run_compose(recipe: dict, base, tokenizer) -> dict:
    """Few-shot composition of registry adapters for the recipe's (single, unseen) task."""
    import numpy as np

    from .composer import Composer
    from .composition import compose
    from .registry import AdapterRegistry
    from .tasks import load_task

    cfg = recipe["compose"]
    if len(recipe["tasks"]) != 1:
        raise RecipeError("compose: expected exactly one task (the unseen one) in tasks")
    data = load_task(recipe["tasks"][0])
    registry = AdapterRegistry(None if recipe["registry"] in (None, "default") else recipe["registry"])
    composer = Composer(base, registry=registry, tokenizer=tokenizer)
    train = data.splits["train"]
    rng = np.random.default_rng(cfg.get("seed", 0))
    shots = int(cfg.get("shots", 16))
    by_class = {c: [i for i, y in enumerate(train["label"]) if y == c] for c in range(len(data.label_names))}
    per_class = max(shots // len(by_class), 1)
    picked = sorted(i for idx in by_class.values() for i in rng.permutation(idx)[:per_class].tolist())
    texts = [train["text"][i] for i in picked]
    labels = [data.label_names[train["label"][i]] for i in picked]
    test = data.splits["test"]
    result = compose(composer, cfg["adapters"], texts, labels, label_names=data.label_names,
                     budget=int(cfg.get("budget", 40)), seed=int(cfg.get("seed", 0)), into=data.spec.name,
                     eval_texts=test["text"], eval_labels=[data.label_names[y] for y in test["label"]])  # fmt: skip
    out = Path(cfg.get("output_dir", f"runs/compose_{data.spec.name}"))
    out.mkdir(parents=True, exist_ok=True)
    published = {}
    if cfg.get("publish"):
        published[data.spec.name] = registry.publish(composer.model, adapter=data.spec.name, task=data.spec.name,
                                                      metrics={"accuracy": result.accuracy["composed"]}, recipe=recipe["raw"])  # fmt: skip
    summary = {"task": data.spec.name, "shots": len(texts), "weights": result.weights, "objective": result.objective,
               "evaluations": result.evaluations, "test_accuracy": result.accuracy, "published": published,
               "output_dir": str(out)}  # fmt: skip
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
