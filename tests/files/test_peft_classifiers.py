"""PEFT classifier adapters (task_type SEQ_CLS / TOKEN_CLS): the LoRA and the ``modules_to_save``
classifier PEFT saves beside it load as one adapter with a head, whose logits are PEFT's.

Each case: a tiny random task model, ``peft.get_peft_model`` with PEFT's standard classifier recipe, LoRA B
and the classifier randomised (so a wrong head, pooling or key mapping fails), ``save_pretrained``, then
``load_adapter`` on the bare backbone inside the task model or on the task model itself.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from helpers import BERT, DISTILBERT, LLAMA, hf_model

from adapters_mtl import AdapterModel, HeadConfig, LoraConfig
from adapters_mtl.files.folder import AdapterFileError, load_adapter, read_adapter, save_adapter

peft = pytest.importorskip("peft")
T = pytest.importorskip("transformers")

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
# these models keep transformers' default dropout (0.1); the shared tiny configs turn it off
_DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
_BERT = dict(BERT, max_position_embeddings=64, **_DROPOUT)


def _bert(cls: str, **kw: Any) -> torch.nn.Module:
    return hf_model(cls, "BertConfig", _BERT, **kw)


def _roberta() -> torch.nn.Module:
    cfg = dict(_BERT, pad_token_id=1, num_labels=3, id2label=LABELS)
    return hf_model("RobertaForSequenceClassification", "RobertaConfig", cfg)


def _distilbert() -> torch.nn.Module:
    cfg = dict(DISTILBERT, max_position_embeddings=64, dropout=0.1, attention_dropout=0.1, num_labels=3)
    return hf_model("DistilBertForSequenceClassification", "DistilBertConfig", cfg, id2label=LABELS)


def _llama() -> torch.nn.Module:
    cfg = dict(LLAMA, max_position_embeddings=64, num_labels=3)
    return hf_model("LlamaForSequenceClassification", "LlamaConfig", cfg)


# family: (task model builder, PEFT task_type, LoRA targets, head style, expected label names)
CASES = {
    "bert-seq": (
        lambda: _bert("BertForSequenceClassification", num_labels=3, id2label=LABELS),
        "SEQ_CLS",
        ["query", "value"],
        "linear",
        tuple(LABELS.values()),
    ),
    "roberta-seq": (_roberta, "SEQ_CLS", ["query", "value"], "roberta", tuple(LABELS.values())),
    "distilbert-seq": (_distilbert, "SEQ_CLS", ["q_lin", "v_lin"], "distilbert", tuple(LABELS.values())),
    "llama-seq": (_llama, "SEQ_CLS", ["q_proj", "v_proj"], "linear", None),
    "bert-token": (
        lambda: _bert("BertForTokenClassification", num_labels=5),
        "TOKEN_CLS",
        ["query", "value"],
        "linear",
        None,
    ),
}


def _inputs():
    # right padding; pad id 0 (Llama's pad_token_id, so its 'last non-pad token' is the last real one)
    ids = torch.tensor([[5, 17, 33, 8, 9, 11], [7, 21, 4, 0, 0, 0], [12, 3, 44, 61, 19, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _peft_folder(case: str, tmp_path, modules_to_save=None):
    """(folder, our base model: a copy of the task model before PEFT touched it, PEFT's logits)."""
    build, task_type, targets, _, _ = CASES[case]
    torch.manual_seed(0)
    task_model = build().eval()
    pristine = copy.deepcopy(task_model)
    config = peft.LoraConfig(
        task_type=task_type, target_modules=targets, r=4, lora_alpha=8, modules_to_save=modules_to_save
    )
    pm = peft.get_peft_model(task_model, config).eval()
    with torch.no_grad():  # every trainable tensor random: LoRA A and B, and the classifier
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
        logits = pm(**_inputs()).logits
    folder = tmp_path / case
    pm.save_pretrained(str(folder))
    return folder, pristine, logits


def _base(task_model, where: str):
    return AdapterModel(task_model.base_model if where == "backbone" else task_model).eval()


@pytest.mark.parametrize("where", ["backbone", "task_model"])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_classifier_gives_peft_logits(case, where, tmp_path):
    folder, task_model, want = _peft_folder(case, tmp_path)
    model = _base(task_model, where)
    assert load_adapter(model, folder, name="x") == "x"
    head = model.head_config("x")
    assert head.kind == ("token_cls" if case.endswith("token") else "seq_cls")
    assert head.style == CASES[case][3] and head.num_labels == want.shape[-1]
    assert head.label_names == CASES[case][4]
    with torch.no_grad():
        out = model(**_inputs(), adapters="x")
    got = torch.stack(out.row_logits)
    mask = _inputs()["attention_mask"].bool()
    if head.kind == "token_cls":  # compare real tokens only (padding logits are never read)
        got, want = got[mask], want[mask]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["bert-seq", "roberta-seq", "llama-seq"])
def test_peft_classifier_in_a_mixed_batch(case, tmp_path):
    folder, task_model, want = _peft_folder(case, tmp_path)
    model = _base(task_model, "backbone")
    load_adapter(model, folder, name="x")
    torch.manual_seed(1)
    model.add_adapter("y", LoraConfig(r=2, targets=tuple(CASES[case][2]), init="random"), head=HeadConfig())
    model.eval()
    with torch.no_grad():
        mixed = model(**_inputs(), adapters=["x", "y", "x"])
        alone_y = model(**_inputs(), adapters="y")
    torch.testing.assert_close(mixed.row_logits[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.row_logits[2], want[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.row_logits[1], alone_y.row_logits[1], atol=1e-5, rtol=0)
    assert mixed.heads["x"].rows.tolist() == [0, 2]


@pytest.mark.parametrize("case", ["roberta-seq", "distilbert-seq", "llama-seq"])
def test_imported_classifier_round_trips_through_our_folder(case, tmp_path):
    folder, task_model, want = _peft_folder(case, tmp_path)
    pristine = copy.deepcopy(task_model)  # AdapterModel wraps its base's layers in place
    model = _base(task_model, "backbone")
    load_adapter(model, folder, name="x")
    ours = save_adapter(model, "x", tmp_path / "ours")
    card = json.loads((ours / "adapter_card.json").read_text())
    assert card["head"].get("style", "linear") == CASES[case][3] and card["label_names"] == (
        list(CASES[case][4]) if CASES[case][4] else None
    )
    read = read_adapter(ours)
    assert not read.peft_head and set(read.head_tensors) >= {"classifier.weight"}
    fresh = _base(pristine, "backbone")
    load_adapter(fresh, ours, name="z")
    assert fresh.head_config("z") == model.head_config("x")
    with torch.no_grad():
        got = torch.stack(fresh(**_inputs(), adapters="z").row_logits)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_head_tensor_names_say_what_they_are(tmp_path):
    folder, _, _ = _peft_folder("roberta-seq", tmp_path)
    read = read_adapter(folder)
    assert read.peft_head
    assert {k: tuple(v.shape) for k, v in read.head_tensors.items()} == {
        "dense.weight": (32, 32),
        "dense.bias": (32,),
        "classifier.weight": (3, 32),
        "classifier.bias": (3,),
    }
    # the LoRA part holds LoRA factors only
    assert all(".lora_" in k for k in read.parts[0].tensors)
    llama = read_adapter(_peft_folder("llama-seq", tmp_path)[0])
    assert set(llama.head_tensors) == {"classifier.weight"} and llama.head.bias is False


def test_other_modules_to_save_are_refused_by_name(tmp_path):
    folder, task_model, _ = _peft_folder("bert-seq", tmp_path, modules_to_save=["pooler"])
    model = _base(task_model, "backbone")
    with pytest.raises(AdapterFileError, match=r"bert\.pooler\.dense"):
        load_adapter(model, folder, name="x")
    assert model.adapter_names == [] and len(model.heads) == 0


def test_classifier_of_another_family_is_refused(tmp_path):
    folder, _, _ = _peft_folder("roberta-seq", tmp_path)
    bert = AdapterModel(_bert("BertModel"))
    with pytest.raises(AdapterFileError, match="RoBERTa's classification head.*'bert'"):
        load_adapter(bert, folder, name="x")
    assert bert.adapter_names == []


def test_bert_classifier_needs_the_pooler(tmp_path):
    folder, _, _ = _peft_folder("bert-seq", tmp_path)
    no_pooler = AdapterModel(T.BertModel(T.BertConfig(**_BERT), add_pooling_layer=False))
    with pytest.raises(AdapterFileError, match="no pooler"):
        load_adapter(no_pooler, folder, name="x")


def test_classifier_with_another_task_type_is_refused(tmp_path):
    folder, task_model, _ = _peft_folder("bert-seq", tmp_path)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "task_type": "FEATURE_EXTRACTION"}))
    with pytest.raises(AdapterFileError, match="task_type='FEATURE_EXTRACTION'"):
        load_adapter(_base(task_model, "backbone"), folder, name="x")


def test_linear_head_cards_are_unchanged():
    keys = {"kind", "num_labels", "pooling", "dropout", "label_names"}  # as written before style/bias existed
    assert set(HeadConfig(num_labels=3).to_dict()) == keys
    assert HeadConfig(style="roberta").to_dict()["style"] == "roberta"
    assert HeadConfig(bias=False).to_dict()["bias"] is False
    with pytest.raises(ValueError, match="token_cls head is linear"):
        HeadConfig(kind="token_cls", style="roberta")


def test_peft_config_with_modules_to_save_says_what_to_do():
    with pytest.raises(ValueError, match="head=HeadConfig"):
        LoraConfig.from_peft(peft.LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
