"""Adapters on task-class bases (BertForSequenceClassification, GPT2LMHeadModel...): import, load, fingerprint.

PEFT names a task model's LoRA keys with its backbone prefix (``base_model.model.bert.encoder...``) and a
bare backbone's without (``base_model.model.encoder...``); both load into either class of the same weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import BERT, DISTILBERT, batch, hf_model, make_config, tiny

from adapters_mtl import AdapterModel
from adapters_mtl.apps.cli import main
from adapters_mtl.data.bases import load_base
from adapters_mtl.files.folder import load_adapter, save_adapter
from adapters_mtl.registry import AdapterRegistry


def _bert_cls() -> torch.nn.Module:
    cfg = dict(BERT, max_position_embeddings=64, num_labels=3)
    return hf_model("BertForSequenceClassification", "BertConfig", cfg)


def _roberta_cls() -> torch.nn.Module:
    cfg = dict(BERT, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, num_labels=3)
    return hf_model("RobertaForSequenceClassification", "RobertaConfig", cfg)


def _distilbert_cls() -> torch.nn.Module:
    cfg = dict(DISTILBERT, max_position_embeddings=64, num_labels=3)
    return hf_model("DistilBertForSequenceClassification", "DistilBertConfig", cfg)


# family: (task model builder, PEFT config builder). No task_type for the encoders: PEFT then adds no
# modules_to_save, so the classifier stays out of the adapter (importing a classifier is another matter).
def _lora(targets, **kw):
    import peft

    return lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw)


def _prefix():
    import peft

    return peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")


CASES = {
    "bert": (_bert_cls, _lora(["query", "value"])),
    "roberta": (_roberta_cls, _lora(["query", "value"])),
    "distilbert": (_distilbert_cls, _lora(["q_lin", "v_lin"])),
    "gpt2-lora": (lambda: tiny("gpt2"), _lora(["c_attn"], task_type="CAUSAL_LM")),
    "gpt2-prefix": (lambda: tiny("gpt2"), _prefix),
}


def _outputs(model, inputs, **kw):
    """(backbone last hidden states, logits) of a task model, PEFT-wrapped or ours."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, **kw)
    return out.hidden_states[-1], out.logits


def _made_with_peft(case, tmp_path):
    """A task-model folder without tokenizer files, a PEFT adapter made on it, and PEFT's model."""
    import peft

    build, peft_cfg = CASES[case]
    torch.manual_seed(0)
    base = build().eval()
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    ref = peft.get_peft_model(copy.deepcopy(base), peft_cfg()).eval()
    if case == "gpt2-prefix":  # a non-trivial prefix (PEFT's init is random already; make it larger)
        with torch.no_grad():
            ref.prompt_encoder["default"].embedding.weight.mul_(3)
    ref.save_pretrained(str(tmp_path / "peft"))
    return base, ref


def _cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", list(CASES))
def test_cli_import_peft_of_a_task_class_adapter_loads_with_peft_outputs(tmp_path, capsys, case):
    base, ref = _made_with_peft(case, tmp_path)
    assert not (tmp_path / "base" / "tokenizer_config.json").exists()  # import-peft needs no tokenizer
    reg = tmp_path / "reg"
    registry = ["registry", "--root", str(reg), "--json"]
    peft_folder, base_folder = str(tmp_path / "peft"), str(tmp_path / "base")
    code, out, err = _cli(
        capsys, *registry, "import-peft", peft_folder, "--name", "imp", "--base", base_folder
    )
    assert code == 0, err
    assert json.loads(out) == {"ref": "imp@1"}

    pad = "right" if case in ("bert", "roberta", "distilbert") else None
    inputs = batch(3, 6, pad=pad)
    mask = inputs["attention_mask"].bool()
    want_hidden, want_logits = _outputs(ref, inputs)
    # the same class, as load_base gives it: PEFT's logits and hidden states
    ours = AdapterModel(load_base(str(tmp_path / "base"), tokenizer=False)[0]).eval()
    assert type(ours.base) is type(base)
    AdapterRegistry(reg).load(ours, "imp@1")
    got_hidden, got_logits = _outputs(ours, inputs, adapters="imp")
    torch.testing.assert_close(got_hidden[mask], want_hidden[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0)
    # the bare backbone of the same weights: same fingerprint, keys read without the task prefix
    bare = AdapterModel(copy.deepcopy(base.base_model)).eval()
    AdapterRegistry(reg).load(bare, "imp@1")
    with torch.no_grad():
        hidden = bare(**inputs, adapters="imp").last_hidden_state
    torch.testing.assert_close(hidden[mask], want_hidden[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["bert", "gpt2-lora"])
def test_api_imports_a_task_class_adapter_onto_the_bare_backbone(tmp_path, case):
    base, ref = _made_with_peft(case, tmp_path)
    bare = AdapterModel(copy.deepcopy(base.base_model)).eval()
    reg = AdapterRegistry(tmp_path / "reg")
    assert reg.import_peft(bare, tmp_path / "peft", "imp") == "imp@1"
    reg.load(bare, "imp@1")
    inputs = batch(3, 6, pad="right" if case == "bert" else None)
    mask = inputs["attention_mask"].bool()
    want, _ = _outputs(ref, inputs)
    with torch.no_grad():
        got = bare(**inputs, adapters="imp").last_hidden_state
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)


def test_adapter_saved_on_bert_model_loads_into_sequence_classifier_and_back(tmp_path):
    import peft

    torch.manual_seed(0)
    task = _bert_cls().eval()
    bare = copy.deepcopy(task.bert)  # a BertModel with the same weights
    inputs = batch(3, 6, pad="right")
    mask = inputs["attention_mask"].bool()
    for src, dst, name in [(bare, task, "from_bare"), (task, bare, "from_task")]:
        torch.manual_seed(2)
        made = AdapterModel(copy.deepcopy(src)).eval()
        made.add_adapter(name, make_config("lora+prefix", "bert", 1))
        folder = save_adapter(made, name, tmp_path / name)
        into = AdapterModel(copy.deepcopy(dst)).eval()
        assert load_adapter(into, folder) == name  # fingerprint and keys agree across the two classes
        with torch.no_grad():
            want = made(**inputs, adapters=name, output_hidden_states=True).hidden_states[-1]
            got = into(**inputs, adapters=name, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)
    # saving writes the names of the class wrapped: PEFT on BertForSequenceClassification reads them as they are
    keys = peft.load_peft_weights(str(tmp_path / "from_task"))
    assert any(k.startswith("base_model.model.bert.encoder.") for k in keys), sorted(keys)[:3]


def _llama_folder(tmp_path):
    import peft

    torch.manual_seed(0)
    base = tiny("llama")
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(tmp_path / "peft"))
    return tmp_path / "base"


def test_folder_without_tokenizer_imports_and_text_commands_name_it(tmp_path, capsys):
    folder = _llama_folder(tmp_path)
    root = str(tmp_path / "reg")
    registry = ["registry", "--root", root, "--json"]
    code, out, err = _cli(
        capsys, *registry, "import-peft", str(tmp_path / "peft"), "--name", "imp", "--base", str(folder)
    )
    assert code == 0, err
    for command in ("generate", "predict"):
        code, _, err = _cli(capsys, command, "hello", "-a", "imp", "--base", str(folder), "--registry", root)
        assert code == 2
        assert str(folder) in err and "no tokenizer" in err and "tokenizer.save_pretrained" in err, err
    # merging tokenizes nothing: the same folder is enough
    code, out, err = _cli(
        capsys, "merge", "-a", "imp", "--name", "merged", "--base", str(folder), "--registry", root, "--json"
    )
    assert code == 0, err


def test_load_base_picks_the_architecture_and_falls_back_to_auto_classes(tmp_path):
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    _bert_cls().save_pretrained(tmp_path / "cls")
    model, tok = load_base(str(tmp_path / "cls"), tokenizer=False)
    assert type(model) is BertForSequenceClassification and tok is None
    config = json.loads((tmp_path / "cls" / "config.json").read_text())
    # unknown, absent, not a model class, a model class of another config
    for architectures in (["NoSuchModelClass"], None, ["AutoTokenizer"], ["GPT2LMHeadModel"]):
        config["architectures"] = architectures
        (tmp_path / "cls" / "config.json").write_text(json.dumps(config))
        assert type(load_base(str(tmp_path / "cls"), tokenizer=False)[0]) is BertModel


def test_a_key_map_that_fits_nothing_is_one_clear_error(tmp_path):
    from adapters_mtl.files.folder import AdapterFileError

    _made_with_peft("gpt2-lora", tmp_path)
    other = AdapterModel(tiny("gpt2", n_layer=1)).eval()  # layer 1 is missing here
    with pytest.raises(AdapterFileError) as e:
        load_adapter(other, tmp_path / "peft", name="imp")
    msg = str(e.value)
    assert "unexpected key base_model.model.transformer.h.1.attn.c_attn.lora_A.weight" in msg
    assert "'transformer.' added" in msg and "transformer.h.0.attn.c_attn.lora_A" in msg
    assert other.adapter_names == []


def test_fingerprints_are_of_the_backbone_and_the_old_whole_model_rule_stays_available():
    from adapters_mtl.files.folder import base_fingerprint

    torch.manual_seed(0)
    task = _bert_cls().eval()
    bare, cls = AdapterModel(copy.deepcopy(task.bert)), AdapterModel(task)
    assert base_fingerprint(bare) == base_fingerprint(cls)  # the classifier and the "bert." prefix left out
    # a bare backbone hashes as it always did; a task class kept its old value under whole_model=True
    assert base_fingerprint(bare, whole_model=True) == base_fingerprint(bare)
    assert base_fingerprint(cls, whole_model=True) != base_fingerprint(cls)
    lm = AdapterModel(tiny("gpt2"))
    assert base_fingerprint(lm) == base_fingerprint(AdapterModel(copy.deepcopy(lm.base.transformer)))
    assert base_fingerprint(lm, whole_model=True) != base_fingerprint(lm)
    assert base_fingerprint(lm) == base_fingerprint(lm)  # the cache holds the backbone value
