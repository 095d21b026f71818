"""Adapter names that torch cannot use as module keys are refused up front, with nothing attached."""

from __future__ import annotations

import pytest
from helpers import LORA_TARGETS, tiny

from adapters_mtl import AdapterModel, HeadConfig, LoraConfig, PrefixConfig
from adapters_mtl.core.config import validate_name


@pytest.mark.parametrize("name", ["half", "to", "train", "keys", "update"])
def test_torch_attribute_names_are_refused_and_nothing_is_attached(name):
    # before: torch's "attribute 'half' already exists" KeyError, with lora_A['half'] left in a layer
    model = AdapterModel(tiny("bert"))
    with pytest.raises(ValueError, match=f"invalid adapter name '{name}'.*torch module attribute"):
        model.add_adapter(
            name,
            [LoraConfig(r=2, targets=LORA_TARGETS["bert"]), PrefixConfig(num_virtual_tokens=2)],
            head=HeadConfig(num_labels=2),
        )
    assert model.adapter_names == [] and not any(f".{name}." in f".{n}." for n, _ in model.named_parameters())
    model.add_adapter(f"{name}_task", LoraConfig(r=2, targets=LORA_TARGETS["bert"]))  # the suggestion works


def test_ordinary_names_still_pass():
    for name in ("news", "tone", "shared", "task0", "a", "lora", "prefix", "default", "base", "Half"):
        assert validate_name(name) == name
