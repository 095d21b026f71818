"""Composing registry adapters for a task none of them was trained on.

Few-shot (:func:`compose`, after LoraHub, Huang et al. 2023): the candidate LoRA adapters are merged as
Σ w_i·ΔW_i (the exact ``cat`` merge) and the weights are searched without gradients — a small evolution
strategy inside [-1.5, 1.5], seeded with the bare base, each single adapter and the uniform mix — to
minimise the leave-one-out loss of a nearest-centroid classifier on the k labelled examples plus
LoraHub's L1 penalty. The composed adapter gets a linear head built from the class centroids
(nearest centroid is a linear rule: logit_c = s·(h·μ_c − ½‖μ_c‖²)), so it is an ordinary adapter: route
it, publish it, load it in PEFT (the LoRA part).

Zero-shot (:func:`compose_zero_shot`): weights from the similarity of the new task's description to the
candidates' descriptions (base-model embeddings), centroids from the label names themselves.

No well-kept library does this on top of per-layer LoRA tensors with routed evaluation (LoraHub's code
is tied to FLAN-T5 and nevergrad), hence the small search written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from ..core.config import HeadConfig
from ..core.heads import pool
from .merging import add_factors, cat_factors, lora_factors

if TYPE_CHECKING:
    from .composer import Composer

__all__ = ["CompositionResult", "compose", "compose_zero_shot"]


@dataclass
class CompositionResult:
    """What :func:`compose` found: the adapter's name, its weights per source, the search's best
    objective and number of evaluations, and (with evaluation data) accuracies of the composed adapter,
    the bare base and every single source adapter, each with centroids from the same examples."""

    adapter: str
    weights: dict[str, float]
    objective: float
    evaluations: int
    accuracy: dict[str, float] | None = None


class _Mixer:
    """The composed adapter, attached once; ``set(w)`` rescales its B columns in place (no re-attach)."""

    def __init__(
        self, composer: Composer, names: list[str], into: str, num_labels: int, label_names: Sequence[str]
    ) -> None:
        self.composer, self.model, self.names, self.into = composer, composer.model, names, into
        parts = [(lora_factors(self.model, n), 1.0) for n in names]
        head = HeadConfig(num_labels=num_labels, pooling="mean", dropout=0.0, label_names=tuple(label_names))
        state = {
            "classifier.weight": torch.zeros(num_labels, self.model.hidden_size),
            "classifier.bias": torch.zeros(num_labels),
        }
        add_factors(self.model, into, cat_factors(parts), head=head, head_state=state)
        composer.cache.adopt(into)
        self.columns = []  # (B parameter, original B, [(source index, lo, hi)])
        for path, (_, B, _) in self.model.factors(into).items():
            lo, spans = 0, []
            for i, (factors, _) in enumerate(parts):
                if path in factors:
                    r = factors[path][0].shape[0]
                    spans.append((i, lo, lo + r))
                    lo += r
            self.columns.append((B, B.detach().clone(), spans))

    @torch.no_grad()
    def set(self, w: np.ndarray) -> None:
        for B, B0, spans in self.columns:
            for i, lo, hi in spans:
                B[:, lo:hi] = B0[:, lo:hi] * float(w[i])

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.composer.tokenize(texts[start : start + batch_size])
            backbone = self.model.backbone
            with self.model.routed(self.into, enc["input_ids"].shape[0]):
                hidden = backbone(**enc).last_hidden_state
            out.append(pool(hidden, enc["attention_mask"], "mean", None).float().cpu())
        return torch.cat(out)


def _centroids(h: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([h[y == c].mean(0) for c in range(k)])


def _loo_loss(h: torch.Tensor, y: torch.Tensor, k: int) -> tuple[float, float]:
    """Leave-one-out nearest-centroid cross-entropy and accuracy (a class with one example keeps it)."""
    counts = torch.bincount(y, minlength=k).float()
    sums = torch.zeros(k, h.shape[1]).index_add_(0, y, h)
    loss, correct = 0.0, 0
    scale = 1.0 / torch.cdist(h, h).pow(2).mean().clamp(min=1e-12)
    for i in range(len(y)):
        c = int(y[i])
        mu = sums / counts[:, None]
        if counts[c] > 1:
            mu = mu.clone()
            mu[c] = (sums[c] - h[i]) / (counts[c] - 1)
        logits = -scale * (h[i] - mu).pow(2).sum(1)
        loss += float(torch.nn.functional.cross_entropy(logits[None], y[i : i + 1]))
        correct += int(logits.argmax()) == c
    return loss / len(y), correct / len(y)


@torch.no_grad()
def _set_head(mixer: _Mixer, h: torch.Tensor, y: torch.Tensor, k: int) -> None:
    mu = _centroids(h, y, k)
    scale = 1.0 / torch.cdist(h, mu).pow(2).mean().clamp(min=1e-12)
    linear = cast(torch.nn.Linear, mixer.model.heads[mixer.into].classifier)
    linear.weight.copy_(scale * mu)
    linear.bias.copy_(-0.5 * scale * mu.pow(2).sum(1))


def _accuracy(
    mixer: _Mixer,
    w: np.ndarray,
    h_train: torch.Tensor,
    y_train: torch.Tensor,
    k: int,
    eval_texts: Sequence[str],
    y_eval: torch.Tensor,
) -> float:
    mixer.set(w)
    h = mixer.embed(eval_texts)
    mu = _centroids(h_train, y_train, k)
    pred = torch.cdist(h, mu).argmin(1)
    return float((pred == y_eval).float().mean())


def _labels(labels: Sequence, label_names: Sequence[str] | None) -> tuple[torch.Tensor, list[str]]:
    names = list(label_names) if label_names is not None else sorted({str(v) for v in labels})
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(v) for v in labels} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not in label_names {names}")
    return torch.tensor([index[str(v)] for v in labels]), names


def compose(
    composer: Composer,
    refs: Sequence[str],
    texts: Sequence[str],
    labels: Sequence,
    *,
    label_names: Sequence[str] | None = None,
    into: str = "composed",
    budget: int = 40,
    l1: float = 0.05,
    seed: int = 0,
    eval_texts: Sequence[str] | None = None,
    eval_labels: Sequence | None = None,
) -> CompositionResult:
    """Few-shot composition of registry LoRA adapters ``refs`` for a new classification task.

    Args:
        composer: a :class:`~adapters_mtl.serving.composer.Composer` (encoder base with a tokenizer).
        refs: candidate adapters (registry references or attached names; LoRA only).
        texts / labels: the k labelled examples (every class at least once; ≥ 2 per class is better).
        label_names: the classes in order (default: the sorted distinct labels).
        into: name of the composed adapter.
        budget: number of weight vectors evaluated by the search.
        l1: LoraHub's penalty on Σ|w_i|.
        eval_texts / eval_labels: held-out data for the accuracy report (composed vs base vs each single).

    Raises:
        ValueError: fewer than 2 classes, a class without examples, non-LoRA candidates, mismatched lengths,
            eval_texts without eval_labels.
    """
    if len(texts) != len(labels):
        raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")
    if eval_texts is not None and eval_labels is None:
        raise ValueError("got eval_texts without eval_labels: pass one label per evaluation text")
    y, names_of_labels = _labels(labels, label_names)
    k = len(names_of_labels)
    missing = [names_of_labels[c] for c in range(k) if int((y == c).sum()) == 0]
    if k < 2 or missing:
        raise ValueError(f"need examples of at least 2 classes and of every class; no examples of {missing}")
    names = composer.resolve(list(refs))
    not_lora = [n for n in names if not composer.model.has_factors(n)]
    if not_lora:
        raise ValueError(f"only LoRA adapters can be composed; {not_lora} are not")
    mixer = _Mixer(composer, names, into, k, names_of_labels)
    n = len(names)
    rng = np.random.default_rng(seed)
    seen: list[tuple[float, np.ndarray]] = []

    def score(w: np.ndarray) -> float:
        mixer.set(w)
        loss, _ = _loo_loss(mixer.embed(texts), y, k)
        seen.append((loss + l1 * float(np.abs(w).sum()), w.copy()))
        return seen[-1][0]

    starts = [np.zeros(n), *np.eye(n), np.full(n, 1.0 / n)]
    for w in starts[:budget]:
        score(w)
    sigma = 0.5
    while len(seen) < budget:  # (1+λ)-style search around the best so far, shrinking steps
        best = min(seen, key=lambda s: s[0])[1]
        for _ in range(min(4, budget - len(seen))):
            score(np.clip(best + sigma * rng.standard_normal(n), -1.5, 1.5))
        sigma *= 0.85
    objective, w_best = min(seen, key=lambda s: s[0])
    accuracy = None
    if eval_texts is not None and eval_labels is not None:
        y_eval, _ = _labels(eval_labels, names_of_labels)
        settings = {
            "composed": w_best,
            "base": np.zeros(n),
            **{composer.cache.ref(m): e for m, e in zip(names, np.eye(n), strict=True)},
        }
        accuracy = {}
        for label, w in settings.items():
            mixer.set(w)
            accuracy[label] = _accuracy(mixer, w, mixer.embed(texts), y, k, eval_texts, y_eval)
    mixer.set(w_best)
    _set_head(mixer, mixer.embed(texts), y, k)
    refs_out = [composer.cache.ref(m) for m in names]
    return CompositionResult(
        into, dict(zip(refs_out, map(float, w_best), strict=True)), objective, len(seen), accuracy
    )


def compose_zero_shot(
    composer: Composer,
    refs: Sequence[str],
    description: str,
    label_names: Sequence[str],
    *,
    into: str = "composed",
    top_k: int = 2,
    temperature: float = 0.05,
) -> CompositionResult:
    """Zero-shot composition: weights = softmax over the ``top_k`` candidates most similar to
    ``description`` (cosine of base-model embeddings of the descriptions in their registry cards), and
    class centroids from the embedded ``label_names``."""
    names = composer.resolve(list(refs))
    cards = []
    registry = composer.registry
    for m in names:
        from_registry = registry is not None and composer.cache.from_registry(m)
        card = registry.show(composer.cache.ref(m))["card"] if registry is not None and from_registry else {}
        cards.append(
            " ".join(
                str(x)
                for x in [
                    card.get("description") or "",
                    card.get("task") or m,
                    *(card.get("label_names") or []),
                ]
            )
        )
    mixer = _Mixer(composer, names, into, len(label_names), tuple(label_names))
    mixer.set(np.zeros(len(names)))
    emb = torch.nn.functional.normalize(mixer.embed([description, *cards]), dim=-1)
    sims = (emb[1:] @ emb[0]).numpy()
    keep = np.argsort(-sims)[:top_k]
    w = np.zeros(len(names))
    w[keep] = np.exp((sims[keep] - sims[keep].max()) / temperature)
    w /= w.sum()
    mixer.set(w)
    h = mixer.embed(list(label_names))
    _set_head(mixer, h, torch.arange(len(label_names)), len(label_names))
    refs_out = [composer.cache.ref(m) for m in names]
    return CompositionResult(into, dict(zip(refs_out, map(float, w), strict=True)), float("nan"), 1)
