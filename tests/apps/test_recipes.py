"""Every shipped recipe runs end to end (real packaged data) with its base swapped for a tiny model, and
the recipe features (per-task adapters, head-only adapters with an unfrozen base, compose) do what they say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import minilm_tokenizer, tiny

from adapters_mtl.apps.recipe import RecipeError, load_recipe, run_recipe

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny BERT and tiny Llama folders with the real MiniLM tokenizer ([SEP] ends causal-LM targets)."""
    tok = minilm_tokenizer()
    tok.eos_token = "[SEP]"
    root = tmp_path_factory.mktemp("bases")
    out = {}
    shape = {"vocab_size": tok.vocab_size, "max_position_embeddings": 256}
    for name, model in (
        ("minilm", tiny("bert", **shape)),
        ("smollm2", tiny("llama", **shape, pad_token_id=tok.pad_token_id)),
    ):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def _overrides(path: Path, folder: Path, tmp_path: Path) -> list[str]:
    spec = load_recipe(path)
    # an AdaLoRA schedule must fit the run: two steps leave room for no warm-up or final phase
    adalora = [
        f"tasks.{i}.adapter.adalora.{k}={v}"
        for i, t in enumerate(spec["tasks"])
        if any(c.method == "adalora" for c in spec["adapters"][t.name])
        for k, v in (("tinit", 0), ("tfinal", 0), ("delta_t", 1))
    ]
    return (
        [
            f"base={folder}",
            "train.steps=2",
            "train.eval_every=1",
            f"train.output_dir={tmp_path / 'run'}",
            f"registry={tmp_path / 'reg'}",
        ]
        + [f"tasks.{i}.limit=40" for i in range(len(spec["tasks"]))]
        + adalora
    )


def _publish_tiny_adapters(folder: Path, registry: Path, names=("news", "tone")) -> None:
    from transformers import AutoModel

    from adapters_mtl import AdapterModel, HeadConfig, LoraConfig
    from adapters_mtl.registry import AdapterRegistry

    model = AdapterModel(AutoModel.from_pretrained(folder, local_files_only=True))
    torch.manual_seed(0)
    reg = AdapterRegistry(registry)
    for name in names:
        model.add_adapter(
            name, LoraConfig(r=4, targets=("query", "value"), init="random"), head=HeadConfig(num_labels=3)
        )
        reg.publish(model, adapter=name, task=name)


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_runs_on_a_tiny_model(tmp_path, bases, recipe):
    path = RECIPES / recipe
    text = path.read_text()
    assert f"adapters-mtl train recipes/{recipe}" in text, "the header must say how to run the recipe"
    spec = load_recipe(path)
    folder = bases["smollm2" if spec["base"] == "smollm2" else "minilm"]
    overrides = _overrides(path, folder, tmp_path)
    if spec["compose"] is not None:
        _publish_tiny_adapters(folder, tmp_path / "reg")
        overrides += [f"compose.output_dir={tmp_path / 'run'}", "compose.budget=4"]
    summary = run_recipe(load_recipe(path, overrides))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    if spec["compose"] is not None:
        assert set(results["test_accuracy"]) >= {"composed", "base"} and len(results["weights"]) == 2
        return
    assert summary["steps"] == 2
    if spec["train"].unfreeze == "none":
        assert set(summary["published"]) == {t.name for t in spec["tasks"]}
    else:
        assert summary["published"] == {} and "fine-tuned" in summary["not_published"]
    for task in spec["tasks"]:
        metrics = results["test"][task.name]
        if task.kind == "seq_cls":
            assert metrics["per_class"] and all("f1" in r for r in metrics["per_class"].values())
    if spec["base"] == "smollm2":  # both causal-LM adapters generated in one routed batch
        assert {s["task"] for s in results["samples"]} == {t.name for t in spec["tasks"]}


def test_per_task_adapters_and_full_fine_tuning(tmp_path, bases):
    import yaml

    recipe = {
        "base": str(bases["minilm"]),
        "tasks": [
            {
                "name": "news",
                "source": "bbc_news",
                "limit": 40,
                "adapter": {"prefix": {"num_virtual_tokens": 4}},
            },
            {"name": "tone", "source": "tweet_sentiment", "limit": 40, "adapter": "none"},
        ],
        "adapter": {"lora": {"r": 2, "targets": ["query"]}},
        "train": {
            "steps": 3,
            "eval_every": 3,
            "unfreeze": "layer\\.1\\.",
            "output_dir": str(tmp_path / "run"),
        },
        "registry": str(tmp_path / "reg"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(path)
    assert [c.method for c in loaded["adapters"]["news"]] == ["prefix"] and loaded["adapters"]["tone"] == []
    summary = run_recipe(loaded)
    n_layer1 = sum(p.numel() for n, p in tiny("bert").named_parameters() if "layer.1." in n)
    assert summary["trainable_params"] > n_layer1 and summary["published"] == {}
    with pytest.raises(RecipeError, match=r"tasks\[0\].adapter: unknown key\(s\) \['lora2'\]"):
        load_recipe(path, ["tasks.0.adapter={lora2: {}}"])
    with pytest.raises(RecipeError, match="unfreeze must be 'none', 'all' or a regular expression"):
        load_recipe(path, ["train.unfreeze=(["])


def test_quantize_in_a_recipe_is_checked_before_the_model_and_reaches_the_base(tmp_path, bases, monkeypatch):
    path = RECIPES / "single_task_lora.yaml"
    overrides = _overrides(path, bases["minilm"], tmp_path)
    with pytest.raises(RecipeError, match=r"quantize: .*'int4'.*nf4"):
        load_recipe(path, [*overrides, "quantize=int4"])
    import adapters_mtl.data.bases as bases_module

    seen = []
    real = bases_module.load_base

    def recording(spec, **kw):
        seen.append(kw.get("quantize"))
        return real(spec, **kw)

    monkeypatch.setattr(bases_module, "load_base", recording)
    summary = run_recipe(load_recipe(path, [*overrides, "quantize=nf4"]))
    assert seen == ["nf4"]
    assert summary  # trained, evaluated and published on the NF4 base
