"""Bottleneck adapters (Houlsby / Pfeiffer) through the method protocol, on BERT-, Llama- and GPT-2-like
tiny models: the formula, routed rows == each alone (mixed widths, non-linearities, layer norms, stacks with
LoRA), save/load bit-exact in our own format (with LoRA beside it still readable by PEFT), hostile config
files refused, gradients only where routed, merge refused, and a seeded training run that learns."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from helpers import LORA_TARGETS, PAD, batch, output, tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters_mtl import AdapterModel, LoraConfig, PrefixConfig
from adapters_mtl.files.folder import AdapterFileError, load_adapter, read_adapter, save_adapter
from adapters_mtl.methods import BottleneckConfig
from adapters_mtl.methods.bottleneck import BottleneckLayer

FAMILIES = ("bert", "llama", "gpt2")


def _model(family: str) -> AdapterModel:
    model = AdapterModel(tiny(family))
    torch.manual_seed(5)
    model.add_adapter("h", BottleneckConfig(placement="houlsby", layer_norm=True, init="random"))
    model.add_adapter("p", BottleneckConfig(size=3, non_linearity="gelu", init="random", scaling=0.5))
    model.add_adapter("q", BottleneckConfig(size=5, init="random"))
    model.add_adapter("lora", LoraConfig(r=2, targets=LORA_TARGETS[family], init="random"))
    return model.eval()


def _run(model, x, family, adapters):
    with torch.no_grad():
        return output(model(**x, adapters=adapters), family)


def test_a_layer_computes_the_papers_formula():
    model = AdapterModel(tiny("bert")).eval()
    torch.manual_seed(0)
    cfg = BottleneckConfig(
        placement="houlsby", layer_norm=True, init="random", non_linearity="tanh", scaling=0.7
    )
    model.add_adapter("a", cfg)
    layer = model.base.get_submodule("encoder.layer.0.attention.output.dense")
    assert isinstance(layer, BottleneckLayer)
    x = torch.randn(2, 5, layer.features)
    with torch.no_grad():
        h = layer.base_layer(x)
        p = layer.params("a")
        z = F.layer_norm(h, (h.shape[-1],), p["norm.weight"], p["norm.bias"], 1e-5)
        want = h + 0.7 * (
            torch.tanh(z @ p["down.weight"].T + p["down.bias"]) @ p["up.weight"].T + p["up.bias"]
        )
        with model.using("a"):
            got = layer(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert p["down.weight"].shape == (cfg.width(layer.features), layer.features)


@pytest.mark.parametrize(("family", "per_layer"), [("bert", 2), ("llama", 2), ("gpt2", 2)])
def test_houlsby_adapts_attention_and_feed_forward_pfeiffer_only_the_feed_forward(family, per_layer):
    model = AdapterModel(tiny(family)).eval()
    model.add_adapter("h", BottleneckConfig(placement="houlsby"))
    model.add_adapter("p", BottleneckConfig(placement="pfeiffer"))
    layers = model.base.config.num_hidden_layers
    method = model.method("bottleneck")
    assert len(method.paths["h"]) == per_layer * layers
    assert len(method.paths["p"]) == layers and set(method.paths["p"]) < set(method.paths["h"])
    x = batch(2, 5, pad=PAD[family])  # near-identity init: the up-projection is zero, so nothing changes yet
    torch.testing.assert_close(_run(model, x, family, "h"), _run(model, x, family, None), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_rows_equal_each_alone_with_stacks(family):
    model = _model(family)
    x = batch(8, 7, pad=PAD[family])
    model.add_adapter("pre", PrefixConfig(num_virtual_tokens=3))  # prefix rows and stacks in the same batch
    with torch.no_grad():
        for p in model.adapter_parameters("pre").values():
            p.normal_(0, 0.5)
    rows = ["h", None, "p", ("lora", "q"), "q", ("p", "h"), "pre", ("lora", "pre", "h")]
    mixed = _run(model, x, family, rows)
    mask = x["attention_mask"].bool()
    for i, entry in enumerate(rows):
        alone = _run(model, x, family, entry)[i]
        torch.testing.assert_close(mixed[i][mask[i]], alone[mask[i]], atol=1e-5, rtol=0)
    assert (mixed[0] - _run(model, x, family, None)[0]).abs().max() > 1e-3  # the adapters really act
    # the inference tables are cached; an in-place change of an adapter (a load, an optimizer step) is seen
    with torch.no_grad():
        for p in model.adapter_parameters("q").values():
            p.add_(0.05)
    again = _run(model, x, family, rows)
    torch.testing.assert_close(again[4][mask[4]], _run(model, x, family, "q")[4][mask[4]], atol=1e-5, rtol=0)
    assert (again[4] - mixed[4]).abs().max() > 1e-4
    # a stack applies its levels in turn: the LoRA under the bottleneck changes the result
    lora_under = _run(model, x, family, ("lora", "q"))
    assert (lora_under - _run(model, x, family, "q")).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_bit_exact_and_peft_reads_the_lora_beside_it(family, tmp_path):
    model = _model(family)
    model.add_adapter(
        "both",
        [LoraConfig(r=2, targets=LORA_TARGETS[family], init="random"), BottleneckConfig(init="random")],
    )
    x = batch(3, 6, pad=PAD[family])
    for name in ("h", "both"):
        folder = save_adapter(model, name, tmp_path / name)
        fresh = AdapterModel(tiny(family)).eval()
        load_adapter(fresh, folder)
        want, got = model.adapter_parameters(name), fresh.adapter_parameters(name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        torch.testing.assert_close(_run(fresh, x, family, name), _run(model, x, family, name), atol=0, rtol=0)
    assert (tmp_path / "h" / "adapters_mtl_config.json").is_file()
    assert not (tmp_path / "h" / "adapter_config.json").exists()  # PEFT has no bottleneck format
    assert (tmp_path / "both" / "bottleneck" / "adapters_mtl_config.json").is_file()
    # the LoRA part stays at the top level, where PEFT reads it
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(tiny(family)), str(tmp_path / "both")).eval()
    lora_only = AdapterModel(tiny(family)).eval()
    lora_only.add_adapter("l", LoraConfig(r=2, targets=LORA_TARGETS[family], init="zeros"))
    with torch.no_grad():
        for k, v in lora_only.adapter_parameters("l").items():
            v.copy_(model.adapter_parameters("both")[k])
        torch.testing.assert_close(
            output(theirs(**x), family), _run(lora_only, x, family, "l"), atol=1e-5, rtol=0
        )


def test_config_files_that_are_wrong_are_refused_with_the_reason(tmp_path):
    model = _model("bert")
    folder = save_adapter(model, "p", tmp_path / "p")
    path = folder / "adapters_mtl_config.json"
    good = json.loads(path.read_text())
    (folder / "adapter_card.json").unlink()  # a folder without a card: no checksums stop the edits below
    for bad, reason in [
        ({**good, "method": "nope"}, "not registered"),
        ({**good, "config": {**good["config"], "size": -3}}, "size must be"),
        ({**good, "config": {**good["config"], "colour": "red"}}, "colour"),
        ([1, 2], "expected a JSON"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(AdapterFileError, match=reason):
            read_adapter(folder)
    assert "p" in model.adapter_names  # the model holding the adapter is untouched


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["placement", "reduction_factor", "size", "non_linearity", "layer_norm", "scaling", "init", "x"]
        ),
        st.one_of(
            st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=True), st.text(max_size=8)
        ),
    )
)
def test_any_config_object_reads_or_is_refused_cleanly(fields):
    from adapters_mtl.files.folder import _parse_native_config

    data = json.dumps({"method": "bottleneck", "config": fields}).encode()
    try:
        cfg = _parse_native_config(data, "fuzz")
    except AdapterFileError:
        return
    assert isinstance(cfg, BottleneckConfig) and cfg.width(64) >= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_the_routed_adapter_and_the_base_stays(family):
    model = _model(family).train()
    x = batch(4, 6, pad=PAD[family])
    before = {k: v.clone() for k, v in model.base_parameters().items()}
    out = output(model(**x, adapters=["h", None, "h", "p"]), family)
    out.float().pow(2).mean().backward()
    for name in ("h", "p"):
        assert all(
            p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapter_parameters(name).values()
        )
    assert all(p.grad is None for n in ("q", "lora") for p in model.adapter_parameters(n).values())
    torch.optim.SGD(model.trainable_parameters(), lr=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in model.base_parameters().items())


def test_merging_is_refused_with_the_reason():
    from adapters_mtl.serving.merging import merge_adapters

    model = _model("llama")
    assert not model.has_factors("p")  # a non-linear adapter is no weight update
    with pytest.raises(ValueError, match="no part that is a weight update"):
        model.merge("p")
    with pytest.raises(ValueError, match=r"\['bottleneck'\]"):
        merge_adapters(model, ["p", "lora"])
    assert "merged" not in model.adapter_names


def test_unknown_model_types_need_targets_and_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="placement must be one of"):
        BottleneckConfig(placement="middle")
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckConfig(non_linearity="softmax")
    model = AdapterModel(tiny("bert"))
    model.base.config.model_type = "mystery"
    with pytest.raises(ValueError, match="pass targets="):
        model.add_adapter("a", BottleneckConfig())
    with pytest.raises(ValueError, match="match no Linear"):
        model.add_adapter("a", BottleneckConfig(targets=("nothing_here",)))
    assert model.adapter_names == []
    model.add_adapter("a", BottleneckConfig(targets=("output.dense",)))  # suffixes, as PEFT matches them
    assert len(model.method("bottleneck").paths["a"]) == 2 * model.base.config.num_hidden_layers


def test_a_seeded_two_task_run_with_bottleneck_adapters_lowers_both_losses(tmp_path):
    from helpers import train_config, two_tasks

    from adapters_mtl.training import MultiTaskTrainer

    tok, tasks, base = two_tasks(tmp_path)
    model = AdapterModel(copy.deepcopy(base))
    torch.manual_seed(0)
    for name, data in tasks.items():
        model.add_adapter(name, BottleneckConfig(placement="houlsby"), head=data.head_config())
    frozen = {k: v.clone() for k, v in model.base_parameters().items()}
    result = MultiTaskTrainer(model, tok, tasks, train_config(tmp_path, steps=80, lr=0.3)).train()
    for t in tasks:
        losses = [h[f"loss/{t}"] for h in result["history"] if f"loss/{t}" in h]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"{t}: {losses}"
        ups = [p for k, p in model.adapter_parameters(t).items() if k.endswith("up.weight")]
        assert any(p.abs().max() > 1e-4 for p in ups)  # the zero-initialised up-projections trained
    assert all(torch.equal(frozen[k], v) for k, v in model.base_parameters().items())


def test_registry_publish_load_composer_use_and_the_cli_inspect(tmp_path):
    from adapters_mtl.registry import AdapterRegistry
    from adapters_mtl.serving.composer import Composer

    model = _model("bert")
    registry = AdapterRegistry(tmp_path / "reg")
    ref = registry.publish(save_adapter(model, "h", tmp_path / "h"))
    assert [r.ref for r in registry.list(method="bottleneck")] == [ref]
    composer = Composer(AdapterModel(tiny("bert")), registry=registry)
    assert composer.use(ref) == composer.active
    x = batch(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(
            composer.model(**x).last_hidden_state, _run(model, x, "bert", "h"), atol=0, rtol=0
        )
    # a damaged native config in the registry is never served: the card's checksum catches it
    folder = Path(registry.resolve(ref).path)
    (folder / "adapters_mtl_config.json").write_text(
        json.dumps({"method": "bottleneck", "config": {"size": 2}})
    )
    assert registry.verify(ref)[ref] != "ok"
    with pytest.raises(AdapterFileError, match="sha256"):
        registry.load(AdapterModel(tiny("bert")), ref)
