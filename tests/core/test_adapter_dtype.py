"""LoRA weights stay fp32 on a bf16/fp16 base (as PEFT's autocast_adapter_dtype): saved adapters round-trip
bit-exact, outputs match PEFT on the same base; adapter_dtype="base" keeps the base's dtype."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import LORA_TARGETS, batch, tiny
from safetensors.torch import load_file

from adapters_mtl import AdapterModel, LoraConfig
from adapters_mtl.files.folder import load_adapter, save_adapter


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_fp32_adapters_on_a_half_precision_base_round_trip_bit_exact_and_match_peft(tmp_path, half):
    base = tiny("llama").to(half)
    model = AdapterModel(copy.deepcopy(base)).eval()
    torch.manual_seed(0)
    model.add_adapter("a", LoraConfig(r=4, targets=LORA_TARGETS["llama"], init="random"))
    params = model.adapter_parameters("a")
    assert params and all(p.dtype == torch.float32 for p in params.values())
    folder = save_adapter(model, "a", tmp_path / "a")
    stored = load_file(folder / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in stored.values())
    fresh = AdapterModel(copy.deepcopy(base)).eval()
    load_adapter(fresh, folder)
    for key, p in fresh.adapter_parameters("a").items():
        assert torch.equal(p, params[key]), key  # bit-exact: nothing went through the half dtype
    inputs = batch(2, 6)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    assert all(p.dtype == torch.float32 for n, p in theirs.named_parameters() if "lora_" in n)
    with torch.no_grad():
        ours = model(**inputs, adapters="a").logits
        want = theirs(**inputs).logits
        plain = base(**inputs).logits
    assert ours.dtype == half
    assert (ours.float() - want.float()).abs().max() <= 1e-2 < (ours.float() - plain.float()).abs().max()


def test_adapter_dtype_base_keeps_the_base_dtype_and_bad_values_are_refused():
    model = AdapterModel(tiny("llama").to(torch.bfloat16), adapter_dtype="base")
    model.add_adapter("a", LoraConfig(r=2, targets=LORA_TARGETS["llama"]))
    assert all(p.dtype == torch.bfloat16 for p in model.adapter_parameters("a").values())
    with pytest.raises(ValueError, match="adapter_dtype='fp32'"):
        AdapterModel(tiny("llama"), adapter_dtype="fp32")
