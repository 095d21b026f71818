"""Our adapter with a head, exported as PEFT's SEQ_CLS / TOKEN_CLS folder: PEFT's task model gives our logits."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import BERT, DISTILBERT, batch, hf_model, tiny

from adapters_mtl import AdapterModel, HeadConfig, LoraConfig
from adapters_mtl.files.folder import export_peft_classifier

# attn_implementation left to transformers (None), as in a config written without it
SMALL = dict(BERT, attn_implementation=None)
CASES = {
    "bert-seq": ("BertConfig", "BertForSequenceClassification", SMALL, "seq_cls", {}, ("query", "value")),
    "bert-tok": ("BertConfig", "BertForTokenClassification", SMALL, "token_cls", {}, ("query", "value")),
    "roberta": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        dict(SMALL, pad_token_id=1),
        "seq_cls",
        {"style": "roberta"},
        ("query", "value"),
    ),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        dict(DISTILBERT, max_position_embeddings=512, attn_implementation=None, seq_classif_dropout=0.0),
        "seq_cls",
        {"style": "distilbert"},
        ("q_lin", "v_lin"),
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForSequenceClassification",
        dict(SMALL, num_key_value_heads=2, pad_token_id=0),
        "seq_cls",
        {"pooling": "last", "bias": False},
        ("q_proj", "v_proj"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_classifier_gives_our_logits_in_peft(tmp_path, case):
    config_cls, model_cls, config, kind, head_kw, targets = CASES[case]
    torch.manual_seed(0)
    task_model = hf_model(model_cls, config_cls, config, num_labels=3).eval()
    backbone = copy.deepcopy(task_model.base_model)
    model = AdapterModel(backbone).eval()
    model.add_adapter(
        "x",
        LoraConfig(r=4, targets=targets, init="random"),
        head=HeadConfig(kind=kind, num_labels=3, dropout=0.0, **head_kw),
    )
    with torch.no_grad():
        for p in model.heads["x"].parameters():
            p.normal_(0, 0.5)  # not HF's initialisation: the export must carry the head
    folder = export_peft_classifier(model, "x", tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(task_model), str(folder)).eval()
    inputs = batch(3, 7)
    inputs["attention_mask"][1, 5:] = 0  # a padded row
    if case == "llama":
        inputs["input_ids"][1, 5:] = 0  # transformers finds a decoder's last token by the pad id
    with torch.no_grad():
        want = theirs(**inputs).logits
        ours = model(**inputs, adapters="x").row_logits
    for i in range(3):
        got = ours[i] if kind == "seq_cls" else ours[i][inputs["attention_mask"][i].bool()]
        ref = want[i] if kind == "seq_cls" else want[i][inputs["attention_mask"][i].bool()]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    plain = copy.deepcopy(task_model)(**inputs).logits
    assert (plain - want).abs().max() > 1e-3  # the exported adapter and head really change the outputs


def test_heads_no_task_class_has_are_refused():
    model = AdapterModel(tiny("bert"))
    model.add_adapter("m", LoraConfig(r=2, targets=("query",)), head=HeadConfig(num_labels=2, pooling="mean"))
    with pytest.raises(ValueError, match="not a head any Hugging Face"):
        export_peft_classifier(model, "m", "/tmp/never-written")
