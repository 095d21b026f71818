"""Recipes: flat, commented YAML files → validated objects → a training run.

A recipe has the keys ``base`` (``minilm``, ``smollm2`` or a local model folder), ``quantize`` (``none``,
``int8``, ``nf4`` or ``fp4``: the base's Linear layers quantized with bitsandbytes, QLoRA), ``tasks`` (a list of
TaskSpec fields), ``adapter`` (config fields per method: ``lora:``, ``adalora:``, ``prefix:``, ``prompt:``,
``ia3:``, ``bottleneck:``, one or several, used for every task unless a task has its own; ``shared:``
LoRA fields of the shared adapter when ``train.sharing`` is ``shared`` or ``adversarial``, default the
task adapters' LoRA; with ``soft`` the task adapters start alike and no shared adapter is made), ``train``
(TrainConfig fields) and ``registry`` (a registry root, ``default``, or ``null`` to skip publishing).
``key.sub=value`` overrides (YAML-parsed values) change any leaf, e.g. ``train.steps=5``.

Recipes are read with YAML 1.2 scalars (``1e-3`` is a number, ``no`` is a string) and bounded: files over
1 MB and aliases expanding past 100,000 nodes are refused before anything is built. Everything that can
be checked without the model is checked before the model loads, and every problem is reported at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.quantize import check_quantize
from ..data.tasks import TaskSpec
from ..methods import METHODS, LoraConfig, get_method
from .recipe_yaml import MAX_BYTES, RecipeError, apply_overrides, read_yaml, report, type_problems
from .run_checks import check_before_model, output_dir, published_ok, start_output

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..data.tasks import TaskData
    from ..model import AdapterModel

DEFAULT_METHOD = next(iter(METHODS))  # an adapter section left out of a recipe: the first method (LoRA)

__all__ = ["RecipeError", "RunError", "apply_overrides", "load_recipe", "read_yaml", "run_recipe"]

TOP_KEYS = {"base", "quantize", "tasks", "adapter", "train", "registry", "description", "compose"}
COMPOSE_KEYS = {"adapters", "shots", "budget", "seed", "publish", "output_dir"}


class RunError(RuntimeError):
    """A run that trained but could not finish everything after; says what was kept and what to run next."""


def _build(cls: type, fields: Any, where: str, problems: list[str]) -> Any:
    """``cls(**fields)``, or None with every problem (unknown keys, wrong types, bad values) appended."""
    if not isinstance(fields, dict):
        problems.append(f"{where}: expected a mapping of {cls.__name__} fields, got {fields!r}")
        return None
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - known)
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    bad = type_problems(cls, {k: v for k, v in fields.items() if k in known}, where)
    problems += bad
    if unknown or bad:
        return None
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        problems.append(f"{where}: {e}")
        return None


def _beside(recipe: Path, source: str) -> str:
    """A file or folder source relative to the recipe's folder when it exists only there."""
    src = Path(source)
    if (
        not src.is_absolute()
        and not src.exists()
        and (recipe.parent / src).exists()
        and not source.startswith("hub:")
    ):
        return str(recipe.parent / src)
    return source


def _adapter_configs(adapter: Any, where: str, problems: list[str]) -> list:
    """``{<method>: {...}, ...}`` (e.g. ``{lora: {...}, prefix: {...}}``) → native configs, one per method
    registered in :mod:`adapters_mtl.methods`; ``none`` → [] (head-only adapters)."""
    if adapter in ("none", None, "null") or adapter == {}:
        return []
    names = " and/or ".join(repr(m) for m in METHODS)
    if not isinstance(adapter, dict):
        problems.append(f"{where}: expected a mapping with {names}, or 'none'; got {adapter!r}")
        return []
    unknown = sorted(set(adapter) - {*METHODS, "shared"})
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; expected {names} (and 'shared')")
    configs = []
    for key, method in METHODS.items():
        if key in adapter:
            fields = adapter[key] if adapter[key] is not None else {}
            cfg = _build(method.config_class, fields, f"{where}.{key}", problems)
            configs += [cfg] if cfg is not None else []
    return configs


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Read, override and validate a recipe (types and ranges of every value; no file or model is loaded
    beyond the recipe itself: :func:`run_recipe` checks data, folders and registry before the model).

    Returns ``{"raw", "path", "base", "tasks", "adapters" (per task), "train", "shared", "compose",
    "registry"}``.

    Raises:
        RecipeError: listing every problem at once, each naming its key, the value and the expected form.
    """
    from ..training.trainer import TrainConfig

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist (or is not a file)")
    if path.stat().st_size > MAX_BYTES:
        raise RecipeError(
            f"recipe {path} is {path.stat().st_size:,} bytes; recipes are limited to {MAX_BYTES:,}"
        )
    raw = read_yaml(path.read_text(encoding="utf-8", errors="replace"), f"recipe {path}") or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping with keys {sorted(TOP_KEYS)}")
    raw = apply_overrides(raw, list(overrides))
    problems: list[str] = []
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        problems.append(f"unknown top-level key(s) {unknown}; expected some of {sorted(TOP_KEYS)}")
    base = raw.get("base", "minilm")
    if not isinstance(base, str) or not base:
        problems.append(f"base: expected 'minilm', 'smollm2' or a local model folder, got {base!r}")
    quantize = None
    try:
        quantize = check_quantize(raw.get("quantize"))
    except ValueError as e:
        problems.append(f"quantize: {e}")
    if quantize is not None and raw.get("compose") is not None:
        problems.append(
            f"quantize: {quantize} with compose: composing merges adapters, which a quantized base cannot "
            "take; remove quantize (or set it to none)"
        )
    registry = raw.get("registry", "default")
    if registry is not None and (not isinstance(registry, str) or not registry):
        problems.append(
            f"registry: expected a folder, an fsspec URL, 'default' or null (no publishing), got {registry!r}"
        )
    if not isinstance(raw.get("tasks"), list) or not raw["tasks"]:
        problems.append("tasks: expected a non-empty list of tasks (each with name and source)")
        raise RecipeError(report(problems))
    default_adapter = raw.get("adapter", {DEFAULT_METHOD: {}})
    default = _adapter_configs(default_adapter, "adapter", problems)
    tasks, adapters = [], {}
    for i, entry in enumerate(raw["tasks"]):
        if not isinstance(entry, dict):
            problems.append(f"tasks[{i}]: expected a mapping with name and source, got {entry!r}")
            continue
        entry = dict(entry)
        own = entry.pop("adapter", None)
        spec = _build(TaskSpec, entry, f"tasks[{i}]", problems)
        configs = _adapter_configs(own, f"tasks[{i}].adapter", problems) if own is not None else default
        if spec is None:
            continue
        # file sources (and each split's) may be written relative to the recipe
        source = spec.source
        resolved = (
            {k: _beside(path, v) for k, v in source.items()}
            if isinstance(source, dict)
            else _beside(path, source)
        )
        object.__setattr__(spec, "source", resolved)
        if spec.name in adapters:
            problems.append(f"tasks[{i}]: a second task named {spec.name!r}; task names must be unique")
        tasks.append(spec)
        adapters[spec.name] = configs
    generative = sorted(t.name for t in tasks if t.kind == "causal_lm")
    if generative and len(generative) != len(tasks):
        problems.append(
            f"tasks: causal_lm tasks {generative} cannot train with head tasks "
            f"{sorted(t.name for t in tasks if t.kind != 'causal_lm')} in one recipe; split the recipe, or make "
            "every task causal_lm (classification as generation)"
        )
    train = _build(TrainConfig, raw.get("train") or {}, "train", problems)
    shared = None
    if train is not None and train.sharing not in ("none", "soft"):
        fields = None
        if isinstance(default_adapter, dict):
            # the shared adapter is a LoRA: adapter.shared, else adapter.lora
            fields = default_adapter.get("shared", default_adapter.get(LoraConfig().method))
        if fields is None:
            problems.append(
                f"train.sharing={train.sharing!r} needs a shared LoRA adapter: add adapter.shared "
                "(LoRA fields, e.g. {r: 8, targets: [query, value]}) or adapter.lora"
            )
        else:
            shared = _build(LoraConfig, fields or {}, "adapter.shared", problems)
        if any(not get_method(c.method).has_factors() for configs in adapters.values() for c in configs):
            problems.append(
                "train.sharing works with LoRA task adapters only (each (shared, task) stack is folded into one "
                "LoRA); remove the other methods' configs"
            )
    compose = raw.get("compose")
    if compose is not None:
        if not isinstance(compose, dict):
            problems.append(f"compose: expected a mapping with keys {sorted(COMPOSE_KEYS)}, got {compose!r}")
        else:
            compose = dict(compose)
            unknown = sorted(set(compose) - COMPOSE_KEYS)
            if unknown or not compose.get("adapters") or not isinstance(compose["adapters"], list):
                problems.append(
                    f"compose: expected keys {sorted(COMPOSE_KEYS)} with a non-empty 'adapters' list; got {sorted(compose)}"
                )
            for key in ("shots", "budget", "seed"):
                value = compose.get(key, 1)
                if (
                    not isinstance(value, int)
                    or isinstance(value, bool)
                    or value < (0 if key == "seed" else 1)
                ):
                    expected = "non-negative" if key == "seed" else "positive"
                    problems.append(f"compose.{key}: expected a {expected} int, got {value!r}")
            if not isinstance(compose.get("output_dir", "runs/x"), str):
                problems.append(f"compose.output_dir: expected a folder path, got {compose['output_dir']!r}")
            if len(raw["tasks"]) != 1:
                problems.append("compose: expected exactly one task (the unseen one) in tasks")
    if problems:
        raise RecipeError(report(problems))
    return {
        "raw": raw,
        "path": str(path),
        "base": base,
        "quantize": quantize,
        "tasks": tasks,
        "adapters": adapters,
        "train": train,
        "shared": shared,
        "compose": compose,
        "registry": registry,
    }


def run_recipe(recipe: dict, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train every task's adapter (or, with ``compose:``, compose published ones) and keep the work as it
    goes: ``output_dir`` is created first, ``metrics.csv`` grows every step, each adapter is saved to
    ``output_dir/adapters/<task>`` before the test evaluation, ``results.json`` (test metrics with per-class
    reports; sample generations of causal-LM tasks, routed in one batch) is written before publishing to
    the registry and updated after.

    Args:
        recipe: from :func:`load_recipe`.
        resume: continue from ``output_dir/checkpoint``.
        overwrite: replace the run already in ``output_dir`` (its metrics, checkpoint, results, adapters).

    Raises:
        RecipeError: before the model loads, every problem at once (data with an empty split, an output
            folder that is a file or holds a run, an unwritable registry...).
        TrainingInterrupted: Ctrl-C; the checkpoint to resume from is written.
        RunError: publishing failed after training; the message gives the commands that publish later.
    """
    import time

    from ..data.bases import load_base
    from ..model import AdapterModel
    from ..training.soft_sharing import start_alike
    from ..training.trainer import MultiTaskTrainer

    tasks = check_before_model(recipe, resume, overwrite)
    compose = recipe.get("compose")
    out = output_dir(recipe)
    start_output(out, overwrite)
    try:
        base, tokenizer = load_base(recipe["base"], quantize=recipe.get("quantize"))
    except ValueError as e:
        raise RecipeError(f"base: {e}") from e
    if compose is not None:
        return _run_compose(recipe, base, tokenizer, tasks[recipe["tasks"][0].name], out)
    model = AdapterModel(base)
    torch.manual_seed(recipe["train"].seed)  # adapter and head initialisation: the same run twice is the same
    if recipe.get("shared") is not None:
        model.add_adapter(recipe["train"].shared_adapter, recipe["shared"])
    for spec in recipe["tasks"]:
        model.add_adapter(spec.name, list(recipe["adapters"][spec.name]), head=tasks[spec.name].head_config())
    if recipe["train"].sharing == "soft":  # fresh adapters: the pull towards the mean starts from one point
        try:
            start_alike(model, list(tasks))
        except ValueError as e:
            raise RecipeError(f"train.sharing: {e}") from e
    owners = [*tasks, *([recipe["train"].shared_adapter] if recipe.get("shared") is not None else [])]
    trainable = sum(p.numel() for t in owners for p in model.adapter_parameters(t).values())
    trainer = MultiTaskTrainer(model, tokenizer, tasks, recipe["train"])
    started = time.perf_counter()
    result = trainer.train(resume_from=out / "checkpoint" if resume else None)
    seconds = time.perf_counter() - started
    from ..training.plots import plot_history

    writer = trainer.acc.is_main_process  # under `accelerate launch`, one process writes and publishes
    plot = out / "training.png"
    if writer:
        plot_history(result["history"], plot, title=f"{', '.join(tasks)} ({result['step']} steps)")
    skipped = published_ok(recipe, recipe["adapters"])
    # the trained adapters are on disk before anything else can fail (test evaluation, publishing)
    validation = {
        t: {f"validation_{k}": v for k, v in best.get("metrics", {}).items()}
        for t, best in result["best"].items()
    }
    folders = (
        {} if skipped or not writer else _save_adapters(model, tasks, out / "adapters", recipe, validation)
    )
    test = {t: trainer.evaluate(t, "test", report=True) for t in tasks}
    base_params = sum(p.numel() for p in model.base_parameters().values())
    summary = {
        "steps": result["step"],
        "seconds": seconds,
        "trainable_params": trainable + sum(p.numel() for p in trainer.unfrozen.values()),
        "base_params": base_params,
        "test": test,
        "best": result["best"],
        "samples": _samples(model, tokenizer, tasks),
        "adapters": {t: str(f) for t, f in folders.items()},
        "published": {},
        "not_published": skipped if recipe["registry"] is not None else None,
        "output_dir": str(out),
        "plot": str(plot),
    }
    if writer:
        _write_json(out / "results.json", summary)
    if folders:  # again, now with the test metrics in their cards (what the registry shows)
        folders = _save_adapters(model, tasks, out / "adapters", recipe, test)
    if folders and recipe["registry"] is not None:
        _publish(folders, recipe["registry"], summary, out)
    return summary


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def _save_adapters(
    model: AdapterModel, tasks: dict, folder: Path, recipe: dict, metrics: dict
) -> dict[str, Path]:
    """Each task's adapter as a registry-publishable folder, its card holding ``metrics[task]`` (the best
    validation metrics at first, the test metrics once they exist)."""
    from ..files.folder import save_adapter

    out = {}
    for t in tasks:
        # plain numbers only (the per-class reports stay in results.json)
        flat = {k: v for k, v in metrics.get(t, {}).items() if not isinstance(v, dict)}
        out[t] = save_adapter(
            model, t, folder / t, task=t, overwrite=True, recipe=recipe["raw"], metrics=flat
        )
    return out


def _publish(folders: dict[str, Path], root: str, summary: dict, out: Path) -> None:
    """Publish the saved folders; a failure keeps results.json (with the error) and says how to retry."""
    from ..registry import AdapterRegistry

    where = None if root == "default" else root
    try:
        registry = AdapterRegistry(where)
        for t, folder in folders.items():
            summary["published"][t] = registry.publish(folder)
    except Exception as e:  # noqa: BLE001 - whatever broke, the trained adapters must not be lost
        left = [t for t in folders if t not in summary["published"]]
        summary["publish_error"] = f"{type(e).__name__}: {e}"
        _write_json(out / "results.json", summary)
        flag = f" --root {shlex.quote(str(root))}" if where is not None else ""
        commands = "\n".join(
            f"  adapters-mtl registry{flag} publish {shlex.quote(str(folders[t]))}" for t in left
        )
        raise RunError(
            f"training finished and its results are kept in {out} (results.json, adapters/), but publishing "
            f"{left} to the registry {root!r} failed: {type(e).__name__}: {e}\nonce the registry works, publish "
            f"them with:\n{commands}"
        ) from e
    _write_json(out / "results.json", summary)


@torch.no_grad()
def _samples(
    model: AdapterModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: dict[str, TaskData],
    per_task: int = 3,
    max_new_tokens: int = 24,
) -> list[dict]:
    """A few test prompts of every causal-LM task, generated in ONE batch routed per row to each task."""
    rows = []  # (task, prompt text, target text)
    for t, data in tasks.items():
        if data.generative:
            test = data.splits["test"]
            pairs = list(zip(test["text"], test["label"], strict=True))[:per_task]
            rows += [(t, text, data.target(label)) for text, label in pairs]
    if not rows:
        return []
    from ..data.batching import pad

    prompts = [{"input_ids": tasks[t].causal_ids(tokenizer, text, None)[0]} for t, text, _ in rows]
    device = next(model.base.parameters()).device
    padded = pad(tokenizer, prompts, "left")  # left: generation continues rightwards
    enc = {k: v.to(device) for k, v in padded.items()}
    model.eval()
    out = model.generate(
        **enc,
        adapters=[t for t, _, _ in rows],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [
        {"task": t, "prompt": text[:200], "target": target.strip(), "output": o.strip()}
        for (t, text, target), o in zip(rows, texts, strict=True)
    ]


def _run_compose(
    recipe: dict, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, data: TaskData, out: Path
) -> dict:
    """Few-shot composition of registry adapters for the recipe's (single, unseen) task."""
    import numpy as np

    from ..registry import AdapterRegistry
    from ..serving.composer import Composer
    from ..serving.lorahub import compose

    cfg = recipe["compose"]
    registry = AdapterRegistry(None if recipe["registry"] in (None, "default") else recipe["registry"])
    composer = Composer(base, registry=registry, tokenizer=tokenizer)
    train = data.splits["train"]
    rng = np.random.default_rng(cfg.get("seed", 0))
    shots = int(cfg.get("shots", 16))
    label_names = data.label_names
    if label_names is None:  # a regression, token_cls or free-generation task has no classes to compose for
        raise RecipeError(
            f"compose: task {data.spec.name!r} ({data.spec.kind}) has no label names; composition needs a "
            "classification task (kind: seq_cls)"
        )
    by_class = {c: [i for i, y in enumerate(train["label"]) if y == c] for c in range(len(label_names))}
    per_class = max(shots // len(by_class), 1)
    picked = sorted(i for idx in by_class.values() for i in rng.permutation(idx)[:per_class].tolist())
    texts = [train["text"][i] for i in picked]
    labels = [label_names[train["label"][i]] for i in picked]
    test = data.splits["test"]
    result = compose(
        composer,
        cfg["adapters"],
        texts,
        labels,
        label_names=label_names,
        budget=int(cfg.get("budget", 40)),
        seed=int(cfg.get("seed", 0)),
        into=data.spec.name,
        eval_texts=test["text"],
        eval_labels=[label_names[y] for y in test["label"]],
    )
    if result.accuracy is None:  # unreachable: compose reports accuracy when given eval texts
        raise RuntimeError("compose returned no test accuracy")
    published = {}
    if cfg.get("publish"):
        name = data.spec.name
        metrics = {"accuracy": result.accuracy["composed"]}
        published[name] = registry.publish(
            composer.model, adapter=name, task=name, metrics=metrics, recipe=recipe["raw"]
        )
    summary = {
        "task": data.spec.name,
        "shots": len(texts),
        "weights": result.weights,
        "objective": result.objective,
        "evaluations": result.evaluations,
        "test_accuracy": result.accuracy,
        "published": published,
        "output_dir": str(out),
    }
    _write_json(out / "results.json", summary)
    return summary
