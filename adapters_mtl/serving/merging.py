"""Merging LoRA adapters in ΔW space.

Methods (``merge_adapters(model, names, weights, method=...)``, listed in :data:`MERGE_METHODS`):

  cat              the default (:data:`DEFAULT_MERGE_METHOD`): exact for any weights and ranks,
                   ΔW = Σ_i w_i·s_i·B_i·A_i = [w_1·s_1·B_1, …]·[A_1; …], rank Σ r_i, scale 1. It is what a
                   stack ("shared", "news") computes, so a trained stack can be published as one
                   self-contained adapter that PEFT loads.
  linear           PEFT's factor-wise combination: A' = Σ √(|w_i|·s_i)·A_i, B' = Σ sign(w_i)·√(|w_i|·s_i)·B_i
                   (equal ranks required; exact for one adapter, cross terms otherwise).
  svd              Σ w_i·ΔW_i truncated to rank ``rank`` (default: the largest input rank) by SVD.
  ties, dare_linear, dare_ties, magnitude_prune
                   the combination of ``peft.utils.merge_utils`` (with ``density``) applied to the per-layer
                   ΔW_i, then truncated by SVD like ``svd``.

Everything works on per-layer tensors (not on a PeftModel as PEFT's ``add_weighted_adapter`` does), so it
also folds snapshots taken during training, keeps per-module ranks and rsLoRA scales exact (the failures
of PEFT issues #3737/#3761), and builds the new adapter completely before attaching it: a failed merge
leaves the model unchanged.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from ..methods.lora_factors import LoraFactors, add_cat, add_factors, cat_factors

if TYPE_CHECKING:
    from ..model import AdapterModel

__all__ = [
    "DEFAULT_MERGE_METHOD",
    "MERGE_METHODS",
    "LoraFactors",
    "add_cat",
    "add_factors",
    "cat_factors",
    "lora_factors",
    "merge_adapters",
]

MERGE_METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# cat: exact for any weights and ranks (linear has cross terms and needs equal ranks)
DEFAULT_MERGE_METHOD = "cat"


def __getattr__(name: str) -> object:
    if name == "METHODS":  # the old name, which read like the adapter methods of adapters_mtl.methods
        warnings.warn(
            "adapters_mtl.serving.merging.METHODS is now MERGE_METHODS (the old name goes in adapters_mtl 0.3)",
            DeprecationWarning,
            stacklevel=2,
        )
        return MERGE_METHODS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lora_factors(model: AdapterModel, name: str, tensors: dict[str, torch.Tensor] | None = None) -> dict:
    """The factors of adapter ``name``: ``{path: (A, B, scale)}`` (:meth:`AdapterModel.factors`).

    ``tensors`` (keys as in ``model.adapter_parameters(name)``) replaces the live values, e.g. a snapshot.
    """
    return model.factors(name, tensors)


def _linear_factors(parts: Sequence[tuple[LoraFactors, float]], names: Sequence[str]) -> dict:
    out = {}
    for path in dict.fromkeys(p for factors, _ in parts for p in factors):
        ranks = {n: f[path][0].shape[0] for (f, _), n in zip(parts, names, strict=True) if path in f}
        if len(set(ranks.values())) != 1:
            raise ValueError(
                f"method 'linear' combines A and B factor by factor, so ranks must match; at {path} the ranks "
                f"are {ranks}. Use method='cat' (exact) or 'svd' (any ranks)."
            )
        As, Bs = [], []
        for factors, w in parts:
            if path in factors:
                a, b, scale = factors[path]
                c = math.sqrt(abs(w) * scale)
                As.append(c * a)
                Bs.append(math.copysign(c, w) * b)
        out[path] = (functools.reduce(operator.add, As), functools.reduce(operator.add, Bs))
    return out


def _low_rank_svd(A: torch.Tensor, B: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``k`` factors of B·A (B: (out, R), A: (R, in)) from two thin QRs and an R×R SVD: exact
    like a full SVD of B·A, at O((out + in)·R²) instead of O(out·in·min(out, in))."""
    Qb, Rb = torch.linalg.qr(B.float())  # (out, R), (R, R)
    Qa, Ra = torch.linalg.qr(A.float().T)  # (in, R), (R, R)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    new_B = (Qb @ U[:, :k]) * S[:k]
    new_A = Vh[:k] @ Qa.T
    return new_A.to(A.dtype).contiguous(), new_B.to(B.dtype).contiguous()


def _svd_factors(
    parts: Sequence[tuple[LoraFactors, float]],
    method: str,
    rank: int | None,
    density: float,
    majority_sign_method: Literal["total", "frequency"],
) -> dict:
    from peft.utils import merge_utils

    out = {}
    if method == "svd":  # Σ w_i·ΔW_i has rank ≤ Σ r_i: truncate it through its factors, never forming ΔW
        for path, (A, B) in cat_factors(parts).items():
            k = min(rank or max(f[path][0].shape[0] for f, _ in parts if path in f), A.shape[0])
            out[path] = _low_rank_svd(A, B, k)
        return out
    for path in dict.fromkeys(p for factors, _ in parts for p in factors):
        present = [(f[path], w) for f, w in parts if path in f]
        (a0, b0, _), _ = present[0]
        deltas = [(b.float() @ a.float()) * scale for (a, b, scale), _ in present]
        weights = torch.tensor([w for _, w in present], dtype=torch.float32)
        if density >= 1.0 and method in ("magnitude_prune", "dare_linear"):
            delta = sum(w * d for w, d in zip(weights.tolist(), deltas, strict=True))
        elif method == "ties":
            delta = merge_utils.ties(deltas, weights, density, majority_sign_method)
        elif method == "dare_ties":
            delta = merge_utils.dare_ties(deltas, weights, density, majority_sign_method)
        else:
            delta = getattr(merge_utils, method)(deltas, weights, density)
        k = min(rank or max(a.shape[0] for (a, _, _), _ in present), *delta.shape)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        out[path] = (Vh[:k].to(a0.dtype).contiguous(), (U[:, :k] * S[:k]).to(b0.dtype).contiguous())
    return out


def merge_adapters(
    model: AdapterModel,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    method: str = DEFAULT_MERGE_METHOD,
    into: str = "merged",
    head: str | None = "last",
    *,
    rank: int | None = None,
    density: float = 1.0,
    majority_sign_method: Literal["total", "frequency"] = "total",
    seed: int = 0,
) -> str:
    """Merge the LoRA adapters ``names`` into a new adapter ``into`` of ``model``.

    Args:
        names: adapters to merge (LoRA only).
        weights: one weight per adapter (default 1 each).
        method: one of :data:`MERGE_METHODS` (see the module docstring); default ``cat``.
        into: the new adapter's name.
        head: ``"last"`` copies the head of the last adapter that has one, a name copies that adapter's
            head, ``None`` adds no head.
        rank: rank of the SVD-based results (default: the largest input rank).
        density: share of values kept by ties / dare_* / magnitude_prune.
        majority_sign_method: ``total`` or ``frequency`` (ties, dare_ties).
        seed: DARE's random pruning seed.

    Returns:
        ``into``.

    Raises:
        ValueError / KeyError: unknown or non-LoRA adapters, wrong number of weights, unknown method,
            ranks that ``linear`` cannot combine; the model is unchanged on error.
    """
    names = list(names)
    for n in names:
        model.method_names(n)  # KeyError for an unknown adapter, before anything else
    if not names:
        raise ValueError("merge_adapters needs at least one adapter name")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(
            f"got {len(weights)} weights for {len(names)} adapters {names}: pass one per adapter"
        )
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; expected one of {list(MERGE_METHODS)}")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ValueError(f"weights must be finite numbers, got {weights}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    not_lora = [n for n in names if not model.has_factors(n)]
    if not_lora:
        raise ValueError(
            f"only LoRA adapters can be merged; {not_lora} have methods "
            f"{[model.method_names(n) for n in not_lora]} (prefix tuning has no weight update to add)"
        )
    source = next((n for n in reversed(names) if n in model.heads), None) if head == "last" else head
    if source is not None and source not in model.heads:
        raise ValueError(f"head={head!r}: adapter {source!r} has no head; heads: {sorted(model.heads)}")
    parts = [(lora_factors(model, n), w) for n, w in zip(names, weights, strict=True)]
    if method == "cat":
        factors = cat_factors(parts)
    elif method == "linear":
        factors = _linear_factors(parts, names)
    else:
        with torch.random.fork_rng(devices=[]):  # DARE's random pruning: seeded, global RNG untouched
            torch.manual_seed(seed)
            factors = _svd_factors(parts, method, rank, density, majority_sign_method)
    dropout = max(c.dropout for n in names for c in model.adapter_config(n))
    head_cfg = model.head_config(source) if source else None
    head_state = model.heads[source].state_dict() if source else None
    add_factors(model, into, factors, dropout=dropout, head=head_cfg, head_state=head_state)
    return into
