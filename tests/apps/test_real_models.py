"""The core on the real packaged models (slow): SmolLM2-135M (Llama family, GQA 9/3 heads) and MiniLM."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters_mtl import AdapterModel, HeadConfig, LoraConfig, PrefixConfig
from adapters_mtl.files.folder import load_peft_state_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from adapters_mtl.data.bases import load_smollm2

    return load_smollm2()


def test_smollm2_routed_lora_and_prefix_match_alone_and_peft(smollm2):
    import peft
    from peft import get_peft_model_state_dict

    base, tok = smollm2
    tok = copy.copy(tok)
    tok.padding_side = "left"
    prompts = ["The capital of France is", "Write a headline: shares rose", "Hi"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    model = AdapterModel(copy.deepcopy(base)).eval()
    torch.manual_seed(0)
    lora = LoraConfig(r=8, alpha=16, targets=("q_proj", "v_proj"), init="random")
    model.add_adapter("lora", lora)
    model.add_adapter("prefix", PrefixConfig(num_virtual_tokens=8, init_std=0.5))
    ref = peft.get_peft_model(
        copy.deepcopy(base), lora.to_peft(init_lora_weights=False, task_type="CAUSAL_LM")
    ).eval()
    with torch.no_grad():
        load_peft_state_dict(model, "lora", get_peft_model_state_dict(ref))
        names = ["lora", "prefix", None]
        mixed = model(**enc, adapters=names).logits
        for i, name in enumerate(names):
            alone = model(**{k: v[i : i + 1] for k, v in enc.items()}, adapters=name).logits[0]
            valid = enc["attention_mask"][i].bool()
            torch.testing.assert_close(mixed[i][valid], alone[valid], atol=1e-4, rtol=1e-4)
        want = ref(**enc).logits
        got = model(**enc, adapters="lora").logits
        mask = enc["attention_mask"].bool()
        torch.testing.assert_close(got[mask], want[mask], atol=1e-4, rtol=1e-4)
        out = model.generate(**enc, adapters=names, max_new_tokens=4, do_sample=False)
        assert out.shape == (3, enc["input_ids"].shape[1] + 4)


def test_minilm_heads_on_real_encoder():
    from adapters_mtl.data.bases import load_minilm

    base, tok = load_minilm()
    model = AdapterModel(base).eval()
    model.add_adapter(
        "a", LoraConfig(r=4, targets=("query", "value"), init="random"), head=HeadConfig(num_labels=4)
    )
    model.add_adapter("b", PrefixConfig(num_virtual_tokens=4), head=HeadConfig(num_labels=2, pooling="mean"))
    enc = tok(
        ["a short one", "a somewhat longer sentence than the first", "third"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model(**enc, adapters=["a", "b", "a"])
        for i, name in enumerate(["a", "b", "a"]):
            alone = model(**{k: v[i : i + 1] for k, v in enc.items()}, adapters=name).row_logits[0]
            torch.testing.assert_close(out.row_logits[i], alone, atol=1e-5, rtol=0)
