"""Shared test helpers: tiny random models built from configs (fast, no downloads), batches, configs.

Imported as ``from helpers import ...`` (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

from typing import Any

import torch

from adapters_mtl import LoraConfig, PrefixConfig


def _with(overrides: dict, **defaults) -> dict:
    return {**defaults, **overrides}


def _bert(**overrides):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        **_with(
            overrides,
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation="sdpa",
        )
    )
    return BertModel(cfg)


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **_with(
            overrides,
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=128,
            attn_implementation="sdpa",
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    return LlamaForCausalLM(cfg)


def _gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        **_with(
            overrides,
            vocab_size=120,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            attn_implementation="sdpa",
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )
    return GPT2LMHeadModel(cfg)


FAMILIES = {"bert": _bert, "llama": _llama, "gpt2": _gpt2}
# Targets with different ranks per family exercise per-module ranks too.
LORA_TARGETS = {
    "bert": ("query", "value", "dense"),
    "llama": ("q_proj", "v_proj", "down_proj"),
    "gpt2": ("c_attn", "c_fc"),
}


def tiny(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random `family` model in eval mode; `overrides` change its config."""
    torch.manual_seed(seed)
    return FAMILIES[family](**overrides).eval()


def batch(B: int = 4, T: int = 7, seed: int = 1, pad: str | None = None) -> dict[str, torch.Tensor]:
    """input_ids (B, T) avoiding special ids, and an attention mask with some padding if `pad` is set."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        for i in range(1, B, 2):
            n = min(i + 1, T - 2)
            if pad == "right":
                mask[i, T - n :] = 0
            else:
                mask[i, :n] = 0
    return {"input_ids": ids, "attention_mask": mask}


def make_config(method: str, family: str, seed: int) -> LoraConfig | PrefixConfig | list:
    """A non-identity adapter config of `method` (LoRA B random so merges are really exercised)."""
    lora = LoraConfig(
        r=4,
        alpha=8,
        targets=LORA_TARGETS[family],
        init="random",
        use_rslora=seed % 2 == 1,
        rank_pattern={LORA_TARGETS[family][0]: 2 + seed},
    )
    prefix = PrefixConfig(num_virtual_tokens=3 + seed, projection=seed % 2 == 1)
    return {"lora": lora, "prefix": prefix, "lora+prefix": [lora, prefix]}[method]


# the padding side each family's tokenizer uses
PAD = {"bert": "right", "llama": "left", "gpt2": "left"}


def output(out: Any, family: str) -> torch.Tensor:
    """The tensor to compare for a family: hidden states of an encoder, logits of a decoder."""
    return out.last_hidden_state if family == "bert" else out.logits
