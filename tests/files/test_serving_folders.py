"""Folders that serving engines read as they are: adapter_model.safetensors holds LoRA weights only (the
head has its own file), keys and config fields follow vLLM's and LoRAX's LoRA loaders; embedding LoRA is
refused in one line; folders written before head.safetensors existed still load."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import peft
import pytest
import torch
from helpers import LORA_TARGETS, batch, make_config, tiny
from safetensors.torch import load_file, save_file

from adapters_mtl import AdapterModel, HeadConfig
from adapters_mtl.files.folder import AdapterFileError, load_adapter, save_adapter

# vLLM's LoRA loader (vllm/lora/utils.py, parse_fine_tuned_lora_name) accepts, under "base_model.model.",
# only "<module>.lora_A.weight", "<module>.lora_B.weight", "<module>.lora_embedding_A" and
# "<module>.lora_embedding_B"; anything else is "unsupported LoRA weight" (restated here, not copied).
_VLLM_KEY = re.compile(r"^base_model\.model\.[\w.]+\.(lora_[AB]\.weight|lora_embedding_[AB])$")


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_lora_folders_hold_only_what_vllm_and_lorax_read(tmp_path, family):
    model = AdapterModel(tiny(family)).eval()
    model.add_adapter("task", make_config("lora", family, 0), head=HeadConfig(num_labels=3))
    folder = save_adapter(model, "task", tmp_path / "task")
    keys = list(load_file(folder / "adapter_model.safetensors"))
    assert keys and all(_VLLM_KEY.match(k) for k in keys), [k for k in keys if not _VLLM_KEY.match(k)]
    assert set(load_file(folder / "head.safetensors")) == {"classifier.weight", "classifier.bias"}
    card = json.loads((folder / "adapter_card.json").read_text())
    assert "head.safetensors" in card["files"]
    config = json.loads((folder / "adapter_config.json").read_text())
    # the fields vLLM's PEFTHelper and LoRAX read, with values both serve
    assert config["peft_type"] == "LORA" and isinstance(config["r"], int) and config["lora_alpha"] > 0
    assert config["bias"] == "none" and not config.get("modules_to_save") and not config.get("use_dora")
    assert isinstance(config["target_modules"], (list, str)) and isinstance(config["use_rslora"], bool)
    # PEFT still loads the folder and ignores the head file
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(tiny(family)), str(folder)).eval()
    inputs = batch(2, 5)
    with torch.no_grad(), model.using("task"):  # the backbone with the LoRA, as PEFT computes it
        ours = model.base(**inputs)
    with torch.no_grad():
        theirs = peft_model(**inputs)
    key = "last_hidden_state" if family == "bert" else "logits"
    assert torch.allclose(getattr(ours, key), getattr(theirs, key), atol=1e-5)


def test_folders_with_the_head_inside_the_weights_file_still_load(tmp_path):
    """The layout written before head.safetensors existed."""
    base = tiny("bert")
    model = AdapterModel(copy.deepcopy(base)).eval()
    model.add_adapter("task", make_config("lora", "bert", 0), head=HeadConfig(num_labels=3))
    folder = save_adapter(model, "task", tmp_path / "task")
    weights = load_file(folder / "adapter_model.safetensors")
    weights.update({f"adapters_mtl.head.{k}": v for k, v in load_file(folder / "head.safetensors").items()})
    save_file(weights, folder / "adapter_model.safetensors")
    (folder / "head.safetensors").unlink()
    card = json.loads((folder / "adapter_card.json").read_text())
    del card["files"]["head.safetensors"]
    card["files"]["adapter_model.safetensors"] = hashlib.sha256(
        (folder / "adapter_model.safetensors").read_bytes()
    ).hexdigest()
    (folder / "adapter_card.json").write_text(json.dumps(card))
    fresh = AdapterModel(copy.deepcopy(base)).eval()
    assert load_adapter(fresh, folder) == "task"
    inputs = batch(2, 5)
    with torch.no_grad():
        assert torch.equal(
            model(**inputs, adapters="task").row_logits[0], fresh(**inputs, adapters="task").row_logits[0]
        )


def test_embedding_lora_is_refused_in_one_clear_line(tmp_path):
    base = tiny("llama")
    peft_model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=2, target_modules=["embed_tokens", *LORA_TARGETS["llama"]], task_type="CAUSAL_LM"),
    )
    peft_model.save_pretrained(str(tmp_path / "emb"))
    fresh = AdapterModel(copy.deepcopy(base))
    with pytest.raises(
        AdapterFileError, match=r"LoRA on embedding layers .*lora_embedding_A/B.* not supported"
    ):
        load_adapter(fresh, tmp_path / "emb", name="emb")
    assert fresh.adapter_names == []
