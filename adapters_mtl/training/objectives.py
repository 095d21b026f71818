"""Per task kind: collation, the training loss of a task's rows in a routed batch, and evaluation.

seq_cls     cross-entropy of the adapter's head; accuracy, macro-F1
regression  MSE of the head; MSE
token_cls   per-token cross-entropy of the head (-100 ignored); token accuracy, macro-F1 over tags
causal_lm   next-token cross-entropy of the base LM head on the target tokens (prompt ignored);
            with label names (classification as generation): accuracy and macro-F1 of the label whose
            name is most likely after the prompt; free generation: target loss and perplexity
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data.batching import pad
from ..data.tasks import TaskData, accuracy, classification_report, macro_f1

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["collate", "evaluate_task", "task_loss"]


def collate(tokenizer: PreTrainedTokenizerBase, features: list[dict]) -> tuple[dict[str, torch.Tensor], list]:
    """Right-pad the model inputs; labels stay one Python object per row (their shape depends on the kind)."""
    labels = [f["labels"] for f in features]
    inputs = [{k: v for k, v in f.items() if k != "labels"} for f in features]
    return pad(tokenizer, inputs, "right"), labels


def _label_tensor(
    labels: list, width: int, device: torch.device | str, regression: bool = False
) -> torch.Tensor:
    if labels and isinstance(labels[0], list):  # per-token labels, right-padded with -100
        out = torch.full((len(labels), width), -100, dtype=torch.long)
        for i, row in enumerate(labels):
            out[i, : len(row)] = torch.tensor(row[:width])
        return out.to(device)
    return torch.tensor(labels, dtype=torch.float32 if regression else torch.long, device=device)


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1; -100 ignored."""
    shifted = logits[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=-100, reduction=reduction
    )
    return loss if reduction == "mean" else loss.view(target.shape)


def task_loss(data: TaskData, task: str, out: Any, rows: list[int], labels: list) -> torch.Tensor:
    """The loss of ``task`` on its ``rows`` of a routed forward's output ``out`` (the base model's output for
    ``causal_lm``, else an :class:`~adapters_mtl.model.AdapterOutput`)."""
    kind = data.spec.kind
    if kind == "causal_lm":
        idx = torch.tensor(rows, device=out.logits.device)
        logits = out.logits.index_select(0, idx)
        return _lm_loss(logits, _label_tensor([labels[i] for i in rows], logits.shape[1], logits.device))
    head = out.heads[task]
    y = _label_tensor(
        [labels[i] for i in head.rows.tolist()],
        head.logits.shape[1] if head.logits.dim() == 3 else 0,
        head.logits.device,
        regression=kind == "regression",
    )
    if kind == "regression":
        return F.mse_loss(head.logits.squeeze(-1).float(), y)
    if kind == "token_cls":
        return F.cross_entropy(head.logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
    return F.cross_entropy(head.logits.float(), y)


@torch.no_grad()
def evaluate_task(
    model: nn.Module,
    data: TaskData,
    tokenizer: PreTrainedTokenizerBase,
    route: str | tuple[str, ...],
    device: torch.device | str,
    split: str = "validation",
    batch_size: int = 64,
    report: bool = False,
) -> dict[str, Any]:
    """Metrics of ``data``'s task on ``split`` with the adapter (or stack) ``route``; ``score`` is the one
    early stopping maximises; ``report`` adds a per-class report (precision/recall/F1/support) for
    classification."""
    if data.choices:
        return _evaluate_choices(model, data, tokenizer, route, device, split, batch_size, report)
    ds = data.encode(tokenizer, split)
    kind = data.spec.kind
    preds, gold, total, count = [], [], 0.0, 0
    for start in range(0, len(ds), batch_size):
        inputs, labels = collate(tokenizer, [ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = model(**inputs, adapters=route)
        if kind == "causal_lm":
            y = _label_tensor(labels, inputs["input_ids"].shape[1], device)
            total += float(_lm_loss(out.logits, y, reduction="none").sum())
            count += int((y[:, 1:] != -100).sum())
            continue
        logits = out.heads[data.spec.name].logits.float().cpu()  # the task's head (also under a stack)
        if kind == "token_cls":
            y = _label_tensor(labels, logits.shape[1], "cpu")
            keep = y != -100
            preds.append(logits.argmax(-1)[keep])
            gold.append(y[keep])
        else:
            preds.append(logits.squeeze(-1) if kind == "regression" else logits.argmax(-1))
            gold.append(torch.tensor(labels))
    if kind == "causal_lm":
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "score": -loss}
    p, g = torch.cat(preds).numpy(), torch.cat(gold).numpy()
    if kind == "regression":
        mse = float(((p - g) ** 2).mean())
        return {"mse": mse, "score": -mse}
    return _classification(p, g, _label_names(data), report)


def _label_names(data: TaskData) -> tuple[str, ...]:
    if data.label_names is None:  # unreachable: load_task names the labels of every classification task
        raise ValueError(f"task {data.spec.name!r} ({data.spec.kind}) has no label names")
    return data.label_names


def _classification(
    pred: np.ndarray, gold: Sequence[int] | np.ndarray, label_names: Sequence[str], report: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "accuracy": accuracy(pred, gold),
        "macro_f1": macro_f1(pred, gold, label_names),
        "score": accuracy(pred, gold),
    }
    if report:
        out["per_class"] = classification_report(pred, gold, label_names)
    return out


def _evaluate_choices(
    model: nn.Module,
    data: TaskData,
    tokenizer: PreTrainedTokenizerBase,
    route: str | tuple[str, ...],
    device: torch.device | str,
    split: str,
    batch_size: int,
    report: bool,
) -> dict[str, Any]:
    """Classification as generation: every label name is scored after the prompt; the likeliest wins."""
    texts, gold = data.splits[split]["text"], data.splits[split]["label"]
    C = len(_label_names(data))
    pairs = [data.causal_ids(tokenizer, t, data.target(c)) for t in texts for c in range(C)]
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        inputs, labels = collate(
            tokenizer, [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": y} for ids, y in chunk]
        )
        inputs = {k: v.to(device) for k, v in inputs.items()}
        y = _label_tensor(labels, inputs["input_ids"].shape[1], device)
        out = model(**inputs, adapters=route)
        scores.append(-_lm_loss(out.logits, y, reduction="none").sum(1).cpu())  # log p(label | prompt)
    pred = torch.cat(scores).view(len(texts), C).argmax(1).numpy()
    return _classification(pred, gold, _label_names(data), report)
