"""Adapters on a quantized base (bitsandbytes int8 / NF4, on CPU): routed rows == each alone for LoRA,
DoRA, prefix, IA3, bottleneck and AdaLoRA; features and dtypes read from the module, not the packed
weight; a seeded QLoRA run learns and leaves the quantized base byte-identical; save/reload on a fresh
quantized base; merging refused with a clear error and nothing changed; ``quantize=`` validated first."""

from __future__ import annotations

import pytest
import torch
from helpers import LORA_TARGETS, PAD, batch, output, tiny

from adapters_mtl import (
    AdaLoraConfig,
    AdapterModel,
    BottleneckConfig,
    HeadConfig,
    IA3Config,
    LoraConfig,
    PrefixConfig,
)
from adapters_mtl.core.quantize import (
    QuantizedMergeError,
    dense_weight,
    is_quantized,
    linear_features,
    quantize_base,
)
from adapters_mtl.data.bases import load_base
from adapters_mtl.files.folder import load_adapter, save_adapter
from adapters_mtl.methods.lora_layer import LoraLayer

bnb = pytest.importorskip("bitsandbytes")

ADA = {"bert": ("query", "value"), "llama": ("q_proj", "v_proj")}


def _quantized(family: str, kind: str, seed: int = 0) -> torch.nn.Module:
    return quantize_base(tiny(family, seed), kind)


def _base_state(model: AdapterModel) -> dict[str, torch.Tensor]:
    """Every tensor of the quantized layers (packed weight, bias, absmax, quant map, int8 row scales)."""
    out = {}
    for path, module in model.base.named_modules():
        if is_quantized(module):
            for k, v in module.state_dict().items():
                out[f"{path}.{k}"] = v.detach().clone()
    return out


def _lora_layers(model: AdapterModel) -> list[LoraLayer]:
    return [m for m in model.base.modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_routed_rows_equal_each_alone_on_a_quantized_base(family, kind):
    model = AdapterModel(_quantized(family, kind))
    torch.manual_seed(3)
    model.add_adapter("lora", LoraConfig(r=4, targets=LORA_TARGETS[family], init="random"))
    model.add_adapter("dora", LoraConfig(r=2, targets=LORA_TARGETS[family], init="random", use_dora=True))
    model.add_adapter("prefix", PrefixConfig(num_virtual_tokens=3))
    model.add_adapter("ia3", IA3Config(init="random"))
    model.add_adapter("bn", BottleneckConfig(init="random"))
    ada = AdaLoraConfig(init_r=4, target_r=2, targets=ADA[family], tinit=1, tfinal=2, delta_t=2, total_step=8)
    model.add_adapter("ada", ada)
    with torch.no_grad():  # AdaLoRA starts as the identity (E = 0): give it singular values
        for k, p in model.adapter_parameters("ada").items():
            if "lora_E" in k:
                p.normal_()
    model.eval()
    layers = [la for la in _lora_layers(model) if is_quantized(la.base_layer)]
    # every target of both blocks (BERT's "dense" matches three Linears a block; its pooler stays fp32)
    assert len(layers) == {"bert": 10, "llama": 6}[family]
    # features from the module (a 4-bit weight is packed (n, 1)); adapters in fp32, never int8/uint8
    storage = torch.int8 if kind == "int8" else torch.uint8
    for layer in layers:
        assert layer.base_layer.weight.dtype == storage
        assert (layer.in_features, layer.out_features) == linear_features(layer.base_layer)
        assert layer.stack_A.dtype == torch.float32 and layer.stack_A.shape[-1] == layer.in_features
    names = ["lora", None, "dora", "prefix", "ia3", "bn", "ada", ("lora", "prefix"), "lora"]
    x = batch(len(names), 8, pad=PAD[family])
    with torch.no_grad():
        mixed = output(model(**x, adapters=names), family)
        bare = output(model(**x, adapters=None), family)
        for i, name in enumerate(names):
            alone = output(model(**{k: v[i : i + 1] for k, v in x.items()}, adapters=name), family)[0]
            valid = x["attention_mask"][i].bool()
            torch.testing.assert_close(mixed[i][valid], alone[valid], atol=1e-5, rtol=0)
            if name is not None:  # each adapter really does something on the quantized base
                assert (mixed[i][valid] - bare[i][valid]).abs().max() > 1e-3, name


def test_dora_norm_reads_the_dequantized_weight():
    model = AdapterModel(_quantized("llama", "nf4"))
    torch.manual_seed(1)
    model.add_adapter("d", LoraConfig(r=2, targets=("q_proj",), init="random", use_dora=True))
    layer = _lora_layers(model)[0]
    W = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    assert W.shape == (layer.out_features, layer.in_features)
    want = torch.linalg.norm(W + layer.scaling["d"] * layer.lora_B["d"] @ layer.lora_A["d"], dim=1)
    torch.testing.assert_close(layer.weight_norm("d"), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dense_weight(layer.base_layer), W, atol=0, rtol=0)


def _qlora_run(adapter_dtype: torch.dtype, kind: str = "nf4") -> tuple[AdapterModel, list[float], dict]:
    model = AdapterModel(_quantized("bert", kind), adapter_dtype=adapter_dtype)
    torch.manual_seed(0)
    head = HeadConfig(num_labels=2, pooling="mean", dropout=0.0)
    model.add_adapter("t", LoraConfig(r=4, alpha=8, targets=("query", "value", "dense")), head=head)
    before = _base_state(model)
    x = batch(8, 6, seed=4)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    optim = torch.optim.AdamW(model.trainable_parameters(), lr=2e-2)
    model.train()
    losses = []
    for _ in range(12):
        optim.zero_grad(set_to_none=True)
        logits = model(**x, adapters="t").heads["t"].logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        losses.append(loss.item())
        optim.step()
    return model.eval(), losses, before


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_qlora_training_learns_and_leaves_the_4bit_base_untouched(adapter_dtype):
    model, losses, before = _qlora_run(adapter_dtype)
    assert losses[-1] < 0.5 * losses[0], losses
    lora = {k: p for k, p in model.adapter_parameters("t").items() if "lora_" in k}
    assert lora and all(p.dtype == adapter_dtype for p in lora.values())
    after = _base_state(model)
    assert before.keys() == after.keys() and any(k.endswith("absmax") for k in after)
    for k, v in before.items():
        assert v.dtype == after[k].dtype and torch.equal(v, after[k]), k
    assert all(p.grad is None for p in model.base_parameters().values())


def test_int8_training_learns_and_leaves_the_base_untouched():
    _, losses, before = _qlora_run(torch.float32, "int8")
    assert losses[-1] < 0.5 * losses[0], losses
    assert any(v.dtype == torch.int8 for v in before.values())


def test_an_adapter_trained_on_a_quantized_base_reloads_on_a_fresh_one(tmp_path):
    model, _, _ = _qlora_run(torch.float32)
    x = batch(3, 6, seed=9)
    with torch.no_grad():
        want = model(**x, adapters="t").heads["t"].logits
    folder = save_adapter(model, "t", tmp_path / "t")
    fresh = AdapterModel(_quantized("bert", "nf4"))  # same seed: the same quantized weights
    assert load_adapter(fresh, folder) == "t"
    with torch.no_grad():
        got = fresh.eval()(**x, adapters="t").heads["t"].logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", [LoraConfig(r=2, targets=("query",), init="random"), IA3Config()])
def test_merging_into_a_quantized_base_is_refused_and_changes_nothing(config):
    model = AdapterModel(_quantized("bert", "nf4"))
    model.add_adapter("a", config)
    before = _base_state(model)
    with pytest.raises(QuantizedMergeError, match=r"cannot merge adapter 'a'.*quantized.*unmerged"):
        model.merge("a")
    assert model.merged_adapter is None
    assert all(torch.equal(v, _base_state(model)[k]) for k, v in before.items())
    layer = next(m for m in model.base.modules() if hasattr(m, "merge") and hasattr(m, "base_layer"))
    with pytest.raises(QuantizedMergeError, match="this layer"):
        layer.merge("a")


def test_plain_bases_still_merge():
    model = AdapterModel(tiny("bert"))
    model.add_adapter("a", LoraConfig(r=2, targets=("query",), init="random"))
    model.merge("a")
    assert model.merged_adapter == "a"


def test_quantize_option_is_checked_before_anything_loads(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=r"quantize='int4'.*'none', 'int8', 'nf4', 'fp4'"):
        load_base(str(missing), quantize="int4")
    with pytest.raises(ValueError, match="not 'minilm', 'smollm2' or a local model folder"):
        load_base(str(missing), quantize="nf4")  # a valid value: the folder is the problem


def test_quantize_base_keeps_the_output_layer_and_computes_in_the_base_dtype():
    model = quantize_base(tiny("llama").to(torch.bfloat16), "nf4")
    assert not is_quantized(model.lm_head)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.compute_dtype == torch.bfloat16
    adapters = AdapterModel(model)
    adapters.add_adapter("a", LoraConfig(r=2, targets=("q_proj",)))
    assert _lora_layers(adapters)[0].stack_A.dtype == torch.float32  # fp32 adapters on a bf16 compute
    assert quantize_base(tiny("bert"), None) is not None and not any(
        is_quantized(m) for m in quantize_base(tiny("bert"), "none").modules()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_routed_rows_equal_each_alone_on_a_cuda_quantized_base(kind):
    model = AdapterModel(quantize_base(tiny("llama").cuda(), kind))
    torch.manual_seed(3)
    model.add_adapter("lora", LoraConfig(r=4, targets=LORA_TARGETS["llama"], init="random"))
    model.add_adapter("prefix", PrefixConfig(num_virtual_tokens=3))
    model.add_adapter("ia3", IA3Config(init="random"))
    model.eval()
    names = ["lora", None, "prefix", "ia3", "lora"]
    x = {k: v.cuda() for k, v in batch(len(names), 8, pad="left").items()}
    with torch.no_grad():
        mixed = model(**x, adapters=names).logits
        for i, name in enumerate(names):
            alone = model(**{k: v[i : i + 1] for k, v in x.items()}, adapters=name).logits[0]
            valid = x["attention_mask"][i].bool()
            # CUDA int8 quantizes each row's activations: equal rows, fp16 kernels' round-off only
            torch.testing.assert_close(mixed[i][valid], alone[valid], atol=2e-3, rtol=0)
