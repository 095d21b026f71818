"""Adapter folders: bit-exact round trips, PEFT reads ours and we read PEFT's, damaged files refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import LORA_TARGETS, PAD, batch, make_config, output, tiny

from adapters_mtl import AdapterModel, HeadConfig
from adapters_mtl.files.folder import AdapterFileError, load_adapter, save_adapter, to_peft_state_dict

METHODS = ["lora", "prefix", "lora+prefix"]


def _saved(tmp_path, family, method, head=None):
    torch.manual_seed(11)
    base = tiny(family)
    model = AdapterModel(copy.deepcopy(base)).eval()
    model.add_adapter("task", make_config(method, family, 1), head=head)
    folder = save_adapter(model, "task", tmp_path / "task", metrics={"acc": 0.5})
    return base, model, folder


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_is_bit_exact(tmp_path, family, method):
    head = HeadConfig(num_labels=3, label_names=("a", "b", "c")) if family == "bert" else None
    base, model, folder = _saved(tmp_path, family, method, head=head)
    fresh = AdapterModel(copy.deepcopy(base)).eval()
    assert load_adapter(fresh, folder) == "task"
    want, got = to_peft_state_dict(model, "task"), to_peft_state_dict(fresh, "task")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    inputs = batch(3, 6, pad=PAD[family])
    with torch.no_grad():
        a, b = model(**inputs, adapters="task"), fresh(**inputs, adapters="task")
        if head is not None:
            for x, y in zip(a.row_logits, b.row_logits, strict=True):
                assert torch.equal(x, y)
            assert fresh.head_config("task").label_names == ("a", "b", "c")
        else:
            assert torch.equal(output(a, family), output(b, family))
    card = json.loads((folder / "adapter_card.json").read_text())
    assert card["methods"] == method.split("+") and card["metrics"] == {"acc": 0.5}
    assert set(card["files"]) >= {"adapter_model.safetensors", "adapter_config.json"}
    assert (folder / "README.md").read_text().startswith("---")


@pytest.mark.parametrize("method", METHODS)
def test_peft_loads_ours_with_identical_outputs(tmp_path, family, method):
    import peft

    base, model, folder = _saved(tmp_path, family, method)
    inputs = batch(3, 6, pad=PAD[family])
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
        if method == "lora+prefix":
            # PEFT holds one method per model: fold the LoRA part in, then load the prefix part
            ref = peft.PeftModel.from_pretrained(ref.merge_and_unload(), str(folder / "prefix")).eval()
        mask = inputs["attention_mask"].bool()
        want = output(ref(**inputs), family)[mask]
        got = output(model(**inputs, adapters="task"), family)[mask]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_we_load_peft_folders_and_round_trip_through_peft_bit_exact(tmp_path, family, method):
    import peft
    from safetensors.torch import load_file

    torch.manual_seed(3)
    base = tiny(family)
    task = "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"
    if method == "lora":
        cfg = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=list(LORA_TARGETS[family]),
            init_lora_weights=False,
            use_rslora=True,
            task_type=task,
        )
    else:
        cfg = peft.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True, task_type=task)
    ref = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    ref.save_pretrained(str(tmp_path / "peft"))
    ours = AdapterModel(copy.deepcopy(base)).eval()
    load_adapter(ours, tmp_path / "peft", name="imported")
    inputs = batch(3, 6, pad=PAD[family])
    with torch.no_grad():
        mask = inputs["attention_mask"].bool()
        torch.testing.assert_close(
            output(ours(**inputs, adapters="imported"), family)[mask],
            output(ref(**inputs), family)[mask],
            atol=1e-5,
            rtol=0,
        )
    # ours -> PEFT -> ours keeps every tensor bit-exact
    save_adapter(ours, "imported", tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    again.save_pretrained(str(tmp_path / "peft2"))
    first, second = (
        load_file(str(tmp_path / "peft" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "peft2" / "adapter_model.safetensors")),
    )
    assert first.keys() == second.keys()
    for k in first:
        assert torch.equal(first[k], second[k]), k


def _flip_byte(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_or_foreign_adapters_are_refused_and_nothing_is_attached(tmp_path):
    base, model, folder = _saved(tmp_path, "llama", "lora+prefix", head=HeadConfig(num_labels=2))
    fresh = AdapterModel(copy.deepcopy(base))

    def refused(path, match, **kw):
        with pytest.raises(AdapterFileError, match=match):
            load_adapter(fresh, path, **kw)
        assert fresh.adapter_names == [] and len(fresh.heads) == 0

    edited = tmp_path / "edited"
    save_adapter(model, "task", edited)
    _flip_byte(edited / "adapter_model.safetensors")
    refused(edited, "adapter_model.safetensors does not match its recorded sha256")

    truncated = tmp_path / "truncated"
    save_adapter(model, "task", truncated)
    p = truncated / "prefix" / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    refused(truncated, "prefix/adapter_model.safetensors does not match")
    (truncated / "adapter_card.json").unlink()  # without the card, safetensors itself refuses the file
    refused(truncated, "not a readable safetensors file")

    other_base = AdapterModel(tiny("llama", seed=99))
    with pytest.raises(AdapterFileError, match="base weights differ"):
        load_adapter(other_base, folder)
    assert other_base.adapter_names == []

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    refused(pickled, "pickle, which adapters_mtl never loads")

    # a plain PEFT prefix folder made for another architecture (wrong geometry)
    import peft

    gpt = peft.get_peft_model(
        tiny("gpt2", n_layer=3), peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    )
    gpt.save_pretrained(str(tmp_path / "gpt_prefix"))
    refused(tmp_path / "gpt_prefix", "belongs to another base model")

    with pytest.raises(FileExistsError):
        save_adapter(model, "task", folder)
    assert load_adapter(fresh, folder) == "task"  # the intact folder still loads
