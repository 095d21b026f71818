"""PEFT's classifier adapters (task_type SEQ_CLS / TOKEN_CLS) both ways: the classifier PEFT saves as
``modules_to_save`` becomes an adapter's head on load, and a LoRA adapter with its head exports as the
folder PEFT makes for a Hugging Face ``*ForSequenceClassification`` / ``*ForTokenClassification``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..core.config import HeadConfig
from ..core.module_paths import backbone_prefix
from ..methods import METHODS
from ..model import AdapterModel
from .card import HEAD_PREFIX, WEIGHTS
from .fingerprint import base_id
from .peft_format import to_peft_state_dict
from .safe_read import AdapterFileError

__all__ = ["complete_peft_head", "export_peft_classifier", "split_peft_head"]


# PEFT's SEQ_CLS / TOKEN_CLS adapters save the task model's classifier (``modules_to_save``) beside the
# LoRA tensors, as ``base_model.model.<module>.weight`` / ``.bias``. Each layout below is one Hugging Face
# head: (head style, pooling, {PEFT module: our Head's module}); the family is checked on load.
_PEFT_HEADS = {
    "roberta": ("roberta", "cls", {"classifier.dense": "dense", "classifier.out_proj": "classifier"}),
    "distilbert": ("distilbert", "cls", {"pre_classifier": "dense", "classifier": "classifier"}),
    "bert": ("linear", "pooler", {"classifier": "classifier"}),  # + *ForTokenClassification
    "decoder": ("linear", "last", {"score": "classifier"}),  # Llama, Mistral, Qwen, GPT-2, ...
}
_ROBERTA_HEAD_TYPES = (
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "data2vec-text",
    "roberta-prelayernorm",
)  # their heads are RobertaClassificationHead's
_PEFT_HEAD_KINDS = {"SEQ_CLS": "seq_cls", "TOKEN_CLS": "token_cls"}


def split_peft_head(
    tensors: dict[str, torch.Tensor], peft_cfg: Any, where: str
) -> tuple[dict[str, torch.Tensor], HeadConfig | None, dict[str, torch.Tensor]]:
    """Take a PEFT classifier (``modules_to_save``) out of an adapter's tensors.

    Returns:
        ``(other tensors, HeadConfig or None, head tensors under our Head's names)``. The head's label names
        and family checks need the base model: :func:`complete_peft_head` adds them.

    Raises:
        AdapterFileError: ``modules_to_save`` tensors that are not one of the classification heads above
            (named), or a classifier in an adapter whose task is not SEQ_CLS / TOKEN_CLS.
    """
    adapter = (
        k for k in tensors if k.startswith(HEAD_PREFIX) or any(m.owns_peft_key(k) for m in METHODS.values())
    )
    extra = sorted(set(tensors) - set(adapter))
    saved = getattr(peft_cfg, "modules_to_save", None)
    if not extra or not saved:  # no classifier (stray keys are reported with the LoRA tensors)
        return tensors, None, {}
    modules: dict[str, dict[str, torch.Tensor]] = {}  # PEFT module path -> {"weight"/"bias": tensor}
    for key in extra:
        path, _, param = key.removeprefix("base_model.model.").rpartition(".")
        if not key.startswith("base_model.model.") or param not in ("weight", "bias"):
            path = key  # not a module's weight or bias: matches no layout, and is named as it is
        modules.setdefault(path, {})[param] = tensors[key]
    layout = next(
        (
            name
            for name, (_, _, names) in _PEFT_HEADS.items()
            if set(modules) == set(names) and all("weight" in modules[m] for m in names)
        ),
        None,
    )
    if layout is None:
        known = sorted({m for _, _, names in _PEFT_HEADS.values() for m in names})
        others = sorted(m for m in modules if m not in known) or sorted(modules)
        raise AdapterFileError(
            f"{where}: modules_to_save={saved!r} saved {others} (keys {extra[:6]}), which is not a "
            f"classification head adapters_mtl can run; it imports the classifier of a SEQ_CLS/TOKEN_CLS "
            "adapter (BERT-like 'classifier', RoBERTa-like 'classifier.dense/out_proj', DistilBERT's "
            "'pre_classifier' + 'classifier', a decoder's 'score'). Retrain without the other modules in "
            "modules_to_save, or serve this adapter with PEFT."
        )
    task = getattr(peft_cfg, "task_type", None)
    kind = _PEFT_HEAD_KINDS.get(task) if isinstance(task, str) else None
    style, pooling, names = _PEFT_HEADS[layout]
    if kind is None or (kind == "token_cls" and style != "linear"):
        raise AdapterFileError(
            f"{where}: holds a classifier ({sorted(modules)}) but task_type={task!r}; adapters_mtl imports "
            "the classifiers of task_type 'SEQ_CLS' and 'TOKEN_CLS' adapters"
        )
    final = modules[next(m for m, ours in names.items() if ours == "classifier")]
    if final["weight"].dim() != 2 or final["weight"].shape[0] == 0:
        raise AdapterFileError(
            f"{where}: the classifier weight has shape {tuple(final['weight'].shape)}; expected (labels, hidden)"
        )
    num_labels = int(final["weight"].shape[0])
    pooling = pooling if kind == "seq_cls" else "auto"
    head = HeadConfig(kind, num_labels, pooling, dropout=0.0, style=style, bias="bias" in final)
    ours = {f"{names[m]}.{param}": t for m, params in modules.items() for param, t in params.items()}
    return {k: v for k, v in tensors.items() if k not in extra}, head, ours


def complete_peft_head(model: AdapterModel, head: HeadConfig, where: Path) -> HeadConfig:
    """A PEFT classifier's head on this base: its family checked, label names and dropout from the config.

    Raises:
        AdapterFileError: the base is not of the family whose head the classifier is (the logits would
            differ from PEFT's).
    """
    cfg = model.config
    model_type = getattr(cfg, "model_type", None)
    backbone = getattr(model.base, "base_model", model.base)
    problem = None
    if head.style == "roberta" and model_type not in _ROBERTA_HEAD_TYPES:
        problem = f"RoBERTa's classification head, for model types {list(_ROBERTA_HEAD_TYPES)}"
    elif head.style == "distilbert" and model_type != "distilbert":
        problem = "DistilBERT's pre_classifier + classifier, for model type 'distilbert'"
    elif head.pooling == "pooler" and getattr(backbone, "pooler", None) is None:
        problem = "a linear classifier on the pooler output (BertForSequenceClassification), but this base has no pooler"
    elif head.pooling == "last" and not model.is_causal:
        problem = "a decoder's 'score' on the last token, but this base is not a decoder"
    if problem:
        raise AdapterFileError(
            f"{where}: the adapter's classifier is {problem}; this base is model type {model_type!r}. Load "
            "it on the base model it was trained on (a bare backbone or its task model)."
        )
    # label names: the task model's id2label, unless it is transformers' default LABEL_0, LABEL_1, ...
    id2label = getattr(cfg, "id2label", None) or {}
    labels = [id2label.get(i, id2label.get(str(i))) for i in range(head.num_labels)]
    default = [f"LABEL_{i}" for i in range(head.num_labels)]
    named = all(isinstance(x, str) for x in labels) and labels != default
    # transformers treats one label (without a problem_type) as regression
    problem_type = getattr(cfg, "problem_type", None)
    regression = head.kind == "seq_cls" and (
        problem_type == "regression" or (head.num_labels == 1 and problem_type is None)
    )
    # the task model's classifier dropout (training only): BERT/RoBERTa, then DistilBERT's names
    rates = ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob")
    dropout = next(
        (d for d in (getattr(cfg, r, None) for r in rates) if isinstance(d, float) and 0 <= d < 1), 0.0
    )
    return dataclasses.replace(
        head,
        kind="regression" if regression else head.kind,
        dropout=dropout,
        label_names=tuple(str(n) for n in labels) if named else None,
    )


# where each head style sits in a Hugging Face task model, for export (the reverse of _PEFT_HEADS)
_EXPORT_HEADS = {
    "roberta": {"dense": "classifier.dense", "classifier": "classifier.out_proj"},
    "distilbert": {"dense": "pre_classifier", "classifier": "classifier"},
}


def export_peft_classifier(
    model: AdapterModel, name: str, directory: str | os.PathLike[str], *, base_model: str | None = None
) -> Path:
    """Write LoRA adapter ``name`` with its head as the folder PEFT makes for ``task_type="SEQ_CLS"`` /
    ``"TOKEN_CLS"``: LoRA keys under the task model's backbone prefix (``bert.``, ``roberta.``, ``model.``)
    and the head as ``modules_to_save`` (``classifier``, ``classifier.dense/out_proj``, ``pre_classifier``,
    ``score``), so ``PeftModel.from_pretrained(<Bert|Roberta|DistilBert|Llama>For…Classification, folder)``
    and ``AutoPeftModelForSequenceClassification`` give this adapter's logits.

    Unlike :func:`save_adapter`'s folders (LoRA weights only, for serving engines), vLLM and LoRAX do not
    load these. Args: ``base_model`` names the base in ``adapter_config.json`` (default :func:`base_id`).

    Raises:
        ValueError: no head, a prefix part, or a head no Hugging Face task class has (e.g. mean pooling).
    """
    head, configs = model.head_config(name), model.adapter_config(name)
    if (
        head is None
        or not model.has_factors(name)
        or len(configs) != 1
        or head.kind not in ("seq_cls", "token_cls")
    ):
        raise ValueError(
            f"adapter {name!r} has configs {[c.method for c in configs]} and head {head}: exporting a PEFT "
            "classifier needs a LoRA-only adapter with a seq_cls or token_cls head"
        )
    (config,) = configs
    causal = model.is_causal
    if head.style in _EXPORT_HEADS:
        places = _EXPORT_HEADS[head.style]
    elif head.kind == "token_cls" or (not causal and head.pooling in ("pooler", "auto")):
        places = {"classifier": "classifier"}  # BERT-like: dropout(pooler output or tokens) -> classifier
    elif causal and head.pooling in ("last", "auto") and not head.bias:
        places = {"classifier": "score"}  # decoders: score (no bias) on the last token
    else:
        raise ValueError(
            f"adapter {name!r}'s head (style {head.style!r}, pooling {head.pooling!r}, bias {head.bias}) is not "
            "a head any Hugging Face *ForSequenceClassification model has; PEFT could not run it"
        )
    prefix, wrapped = backbone_prefix(model.base)
    outer = "base_model.model."
    tensors = {}
    for key, t in to_peft_state_dict(model, name).items():
        tail = key.removeprefix(outer)
        tensors[outer + (tail if wrapped or not prefix else f"{prefix}.{tail}")] = t
    for ours, p in model.heads[name].named_parameters():
        module, _, leaf = ours.rpartition(".")
        tensors[f"{outer}{places[module]}.{leaf}"] = p.detach().contiguous().clone()
    task = "SEQ_CLS" if head.kind == "seq_cls" else "TOKEN_CLS"
    peft_cfg = model.method(config.method).peft_config(
        name, config, task_type=task, base_model=base_model or base_id(model)
    )
    peft_cfg.modules_to_save = sorted({p.split(".")[0] for p in places.values()})
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=False)
    peft_cfg.save_pretrained(str(target))
    save_file(tensors, str(target / WEIGHTS), metadata={"format": "pt"})
    return target
