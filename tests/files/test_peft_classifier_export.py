"""Our adapter with a head, exported as PEFT's SEQ_CLS / TOKEN_CLS folder: PEFT's task model gives our logits."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from helpers import batch

from adapters_mtl import AdapterModel, HeadConfig, LoraConfig
from adapters_mtl.files.folder import export_peft_classifier

SMALL = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=128,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
CASES = {
    "bert-seq": ("BertConfig", "BertForSequenceClassification", {}, "seq_cls", {}, ("query", "value")),
    "bert-tok": ("BertConfig", "BertForTokenClassification", {}, "token_cls", {}, ("query", "value")),
    "roberta": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        {"pad_token_id": 1},
        "seq_cls",
        {"style": "roberta"},
        ("query", "value"),
    ),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        {
            "dim": 32,
            "n_layers": 2,
            "n_heads": 4,
            "hidden_dim": 48,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "seq_classif_dropout": 0.0,
        },
        "seq_cls",
        {"style": "distilbert"},
        ("q_lin", "v_lin"),
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForSequenceClassification",
        {"num_key_value_heads": 2, "pad_token_id": 0},
        "seq_cls",
        {"pooling": "last", "bias": False},
        ("q_proj", "v_proj"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_classifier_gives_our_logits_in_peft(tmp_path, case):
    config_cls, model_cls, extra, kind, head_kw, targets = CASES[case]
    kw = dict(SMALL, **extra) if config_cls != "DistilBertConfig" else dict(vocab_size=120, **extra)
    torch.manual_seed(0)
    task_model = getattr(transformers, model_cls)(
        getattr(transformers, config_cls)(num_labels=3, **kw)
    ).eval()
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
    from helpers import tiny

    model = AdapterModel(tiny("bert"))
    model.add_adapter("m", LoraConfig(r=2, targets=("query",)), head=HeadConfig(num_labels=2, pooling="mean"))
    with pytest.raises(ValueError, match="not a head any Hugging Face"):
        export_peft_classifier(model, "m", "/tmp/never-written")
