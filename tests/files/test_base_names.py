"""Published folders name their base by a Hub id, never a path of the publishing machine (issue 11, 7)."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
from helpers import LORA_TARGETS, tiny
from transformers import AutoModelForCausalLM

from adapters_mtl import AdapterModel, LoraConfig
from adapters_mtl.files.folder import base_id, load_adapter, save_adapter


def _publishable(base, tmp_path):
    model = AdapterModel(base)
    model.add_adapter("a", LoraConfig(r=2, targets=LORA_TARGETS["llama"]))
    folder = save_adapter(model, "a", tmp_path / "a")
    card = json.loads((folder / "adapter_card.json").read_text())
    config = json.loads((folder / "adapter_config.json").read_text())
    return model, card, config


def test_a_base_from_a_local_folder_is_never_named_by_its_path(tmp_path):
    tiny("llama").save_pretrained(tmp_path / "my-base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "my-base")
    assert str(tmp_path) in base.config.name_or_path
    model, card, config = _publishable(base, tmp_path)
    assert base_id(model) is None and card["base_model"] is None and config["base_model_name_or_path"] is None
    assert str(tmp_path) not in json.dumps(card) + json.dumps(config)
    assert card["base_model_type"] == "llama" and card["base_fingerprint"].startswith("sha256:")


def test_a_hub_id_is_kept(tmp_path):
    base = tiny("llama")
    base.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    _, card, config = _publishable(base, tmp_path)
    assert card["base_model"] == config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_plain_peft_folder_for_another_named_base_loads_with_a_warning(tmp_path):
    base = tiny("llama")
    made = copy.deepcopy(base)
    made.config.name_or_path = made.name_or_path = "org/one-model"  # what from_pretrained sets
    peft.get_peft_model(
        made, peft.LoraConfig(r=2, target_modules=list(LORA_TARGETS["llama"]))
    ).save_pretrained(str(tmp_path / "plain"))
    other = copy.deepcopy(base)
    other.config.name_or_path = "org/another-model"
    with pytest.warns(
        UserWarning, match="made for base 'org/one-model' but is loaded into 'org/another-model'"
    ):
        load_adapter(AdapterModel(other), tmp_path / "plain", name="p")
    same = copy.deepcopy(base)
    same.config.name_or_path = "org/one-model"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(AdapterModel(same), tmp_path / "plain", name="p")


def test_cards_with_the_older_whole_model_fingerprint_still_load(tmp_path):
    from adapters_mtl.files.folder import AdapterFileError, base_fingerprint

    base = tiny("llama")
    model, card, _ = _publishable(copy.deepcopy(base), tmp_path)
    assert card["base_fingerprint"] == base_fingerprint(model) != base_fingerprint(model, whole_model=True)
    path = tmp_path / "a" / "adapter_card.json"
    for value, loads in ((base_fingerprint(model, whole_model=True), True), ("sha256:" + "0" * 64, False)):
        path.write_text(json.dumps({**card, "base_fingerprint": value}))
        fresh = AdapterModel(copy.deepcopy(base))
        if loads:
            assert load_adapter(fresh, tmp_path / "a") == "a"
        else:
            with pytest.raises(AdapterFileError, match="base weights differ"):
                load_adapter(fresh, tmp_path / "a")
