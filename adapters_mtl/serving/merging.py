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
                   ΔW_i, then truncated to rank ``rank`` like ``svd`` (PEFT's ``*_svd`` combination types,
                   same values). Faster than PEFT: layers of one shape are batched, the top-k magnitudes
                   found by selection (kthvalue) not topk, and the pruned, full-rank sum truncated by a
                   subspace iteration checked to fp32 round-off (``svd_solver="full"``: LAPACK, as PEFT).

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
    "SVD_SOLVERS",
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
SVD_SOLVERS = ("auto", "full")


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


# Chunks of consecutive modules whose ΔW_i are held at once (elements per adapter, 4 MiB in float32): the
# elementwise pruning and sign election then run in cache (measured 2^18..2^23: 2^20 fastest, ~15%), and
# memory stays bounded whatever the model.
_CHUNK_ELEMENTS = 1 << 20
_MAX_ITER = 16  # subspace iterations before LAPACK takes over (3-6 suffice when the spectrum has a gap)


def _float(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (bool) as float32 0/1 through int32: torch's direct bool→float cast (also taken when a
    bool tensor meets a float one) is ~8x slower on CPU."""
    return mask.to(torch.int32).to(torch.float32)


def _kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of each row of ``mag`` (R, N), as (R, 1); exact.

    A strided sample of ~4096 values per row brackets it between two sample order statistics (± 4
    standard deviations of the sample quantile: a band of ~6% of the row); counting the values above the
    band and selecting inside it costs two passes and a kthvalue over the band, ~3x less than a
    ``torch.kthvalue`` of the row, which rows whose bracket misses (a very structured row) take instead."""
    R, N = mag.shape
    sample = mag[:, :: max(1, N // 4096)].sort(dim=1).values  # (R, M)
    M = sample.shape[1]
    at, half = (N - k) / N * M, 4 * math.sqrt(M * (N - k) * k) / N + 2  # the target's sample position
    i_lo, i_hi = math.floor(at - half), math.ceil(at + half)
    inf = torch.full((R, 1), math.inf, dtype=mag.dtype)
    lo = sample[:, i_lo : i_lo + 1] if i_lo >= 0 else -inf
    hi = sample[:, i_hi : i_hi + 1] if i_hi < M else inf
    above = (mag > hi).sum(1, dtype=torch.int32)  # int32: the default int64 bool sum is ~10x slower
    band = (mag > lo) & (mag <= hi)
    t = torch.empty(R, 1, dtype=mag.dtype)
    for i, (n_above, n_band) in enumerate(
        zip(above.tolist(), band.sum(1, dtype=torch.int32).tolist(), strict=True)
    ):
        j = k - n_above  # the target is the j-th largest in the band
        if 0 < j <= n_band:
            t[i] = torch.kthvalue(torch.masked_select(mag[i], band[i]), n_band - j + 1).values
        else:
            t[i] = torch.kthvalue(mag[i], N - k + 1).values
    return t


def _magnitude_prune_(T: torch.Tensor, density: float) -> None:
    """PEFT's ``magnitude_based_pruning`` of each (out, in) matrix of ``T`` (..., out, in), in place.

    PEFT keeps the ``int(density·numel)`` largest |values| with ``torch.topk`` (a partial sort); the same
    set is the values ≥ the k-th largest, found by selection (:func:`_kth_largest`). Where values equal to
    it would keep more than k (topk's choice among equal values is arbitrary), that matrix takes topk, so
    exactly k values are kept as in PEFT."""
    numel = T.shape[-2] * T.shape[-1]
    k = int(density * numel)
    if k >= numel:
        return
    flat = T.view(-1, numel)
    if k == 0:
        flat.zero_()
        return
    mag = flat.abs()
    keep = mag >= _kth_largest(mag, k)
    for i in torch.nonzero(keep.sum(1, dtype=torch.int32) != k).flatten().tolist():
        keep[i] = False
        keep[i, torch.topk(mag[i], k).indices] = True
    flat.mul_(_float(keep))


def _disjoint_merge(T: torch.Tensor, weights: list[float], sign_method: str) -> torch.Tensor:
    """``merge_utils.calculate_majority_sign_mask`` then ``disjoint_merge(T·w, mask)`` over dim 0 of ``T``
    (n, ...), the same float operations in the same order, without PEFT's sign() and int64 counts (~5x
    fewer bytes moved). Overwrites ``T``."""
    if sign_method == "total":
        elected = functools.reduce(operator.add, T.unbind(0)) >= 0  # majority sign +, ties → +
    elif sign_method == "frequency":
        elected = T.sign().sum(0) >= 0
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    mixed, count = torch.zeros_like(T[0]), torch.zeros_like(T[0])
    for t, w in zip(T.unbind(0), weights, strict=True):
        agrees = (t > 0) == elected  # sign == majority: also true where t == 0 and the majority is -
        agrees &= t != 0
        agrees_f = _float(agrees)
        mixed.add_(t.mul_(w).mul_(agrees_f))  # 0 + x is exact: the same sums as PEFT's .sum(0)
        count.add_(agrees_f)
    return mixed.div_(count.clamp_(min=1.0))


def _top_k_svd(D: torch.Tensor, k: int, block: int, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``k`` factors ``(A (G, k, in), B (G, out, k))`` of each ``D`` (G, out, in), float32.

    ``solver="full"``: ``torch.linalg.svd`` (LAPACK), what PEFT runs. ``"auto"``: block subspace iteration
    (Halko, Martinsson & Tropp 2011, alg. 4.4) with ``block`` columns and a Rayleigh-Ritz step, stopped when
    every top-k Ritz triplet has residual ‖D·v_i − σ_i·u_i‖ ≤ 2·eps·√max(out, in)·σ_1: then (U_k, S_k, V_k)
    are exact singular triplets of D + E with ‖E‖ at LAPACK's own backward-error level (fp32 round-off).
    Matrices not converged within ``_MAX_ITER`` iterations are redone with LAPACK. Pruned ΔW is full rank,
    but its spectrum is the Σr_i values of the merged updates above a noise floor, so with block ≥ Σr_i + k
    it converges in 3-6 iterations: bmm with ``block`` columns instead of an O(out·in·min) SVD.
    The start block comes from a fixed private generator: deterministic, the global RNG untouched."""
    G, m, n = D.shape
    if solver == "full" or 2 * block >= min(m, n):
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        return Vh[:, :k], U[:, :, :k] * S[:, None, :k]
    gen = torch.Generator(device=D.device).manual_seed(0)
    omega = torch.randn(G, n, block, generator=gen, device=D.device, dtype=D.dtype)
    Q = torch.linalg.qr(D @ omega).Q  # (G, m, block)
    tol = 2 * torch.finfo(D.dtype).eps * math.sqrt(max(m, n))
    for it in range(_MAX_ITER):
        W = D.mT @ Q  # (G, n, block) = (Qᵀ·D)ᵀ: the Rayleigh-Ritz matrix and the next half-step at once
        if it >= 2:
            Ub, S, Vh = torch.linalg.svd(W.mT, full_matrices=False)  # (G, block, block), (G, block), ...
            Vk, Uk, Sk = Vh[:, :k], Q @ Ub[:, :, :k], S[:, None, :k]
            residual = (D @ Vk.mT - Uk * Sk).norm(dim=1).amax(1)  # (G,): worst top-k triplet
            done = residual <= tol * S[:, 0]
            if bool(done.all()):
                return Vk, Uk * Sk
        Q = torch.linalg.qr(D @ torch.linalg.qr(W).Q).Q
    A, B = Vk.clone(), Uk * Sk
    todo = (~done).nonzero().flatten()
    U, S, Vh = torch.linalg.svd(D[todo], full_matrices=False)
    A[todo], B[todo] = Vh[:, :k], U[:, :, :k] * S[:, None, :k]
    return A, B


def _chunks(paths: list[str], parts: Sequence[tuple[LoraFactors, float]]) -> list[list[str]]:
    """Consecutive runs of ``paths`` of at most ``_CHUNK_ELEMENTS`` ΔW elements (per adapter)."""
    chunks: list[list[str]] = [[]]
    size = 0
    for path in paths:
        a, b, _ = next(f[path] for f, _ in parts if path in f)
        if chunks[-1] and size + b.shape[0] * a.shape[1] > _CHUNK_ELEMENTS:
            chunks.append([])
            size = 0
        chunks[-1].append(path)
        size += b.shape[0] * a.shape[1]
    return chunks


@torch.no_grad()
def _svd_factors(
    parts: Sequence[tuple[LoraFactors, float]],
    method: str,
    rank: int | None,
    density: float,
    majority_sign_method: Literal["total", "frequency"],
    svd_solver: str = "auto",
) -> dict:
    """``svd`` through the factors; ties / dare_* / magnitude_prune as ``peft.utils.merge_utils`` computes
    them on the per-layer ΔW_i (its sign election and disjoint merge, PEFT's DARE masks), batched over the
    layers of one shape, then truncated by :func:`_top_k_svd`.

    Not merge_utils itself: it takes one layer at a time, prunes with ``topk`` and elects signs through
    ``sign()`` and int64 counts, 3-5x slower than the selection and bool/float32 steps here, which repeat
    its float operations in its order (tests compare with ``add_weighted_adapter``)."""
    out = {}
    if method == "svd":  # Σ w_i·ΔW_i has rank ≤ Σ r_i: truncate it through its factors, never forming ΔW
        for path, (A, B) in cat_factors(parts).items():
            k = min(rank or max(f[path][0].shape[0] for f, _ in parts if path in f), A.shape[0])
            out[path] = _low_rank_svd(A, B, k)
        return out
    prune = density < 1.0
    paths = list(dict.fromkeys(p for factors, _ in parts for p in factors))
    for chunk in _chunks(paths, parts):
        # group the chunk's modules by (adapters present, shape, rank k, block): one batch each
        groups: dict[tuple, list[str]] = {}
        for path in chunk:
            idx = tuple(i for i, (f, _) in enumerate(parts) if path in f)
            ranks = [parts[i][0][path][0].shape[0] for i in idx]
            a, b, _ = parts[idx[0]][0][path]
            k = min(rank or max(ranks), b.shape[0], a.shape[1])
            groups.setdefault((idx, b.shape[0], a.shape[1], k, sum(ranks) + k), []).append(path)
        buffers = {key: torch.empty(len(key[0]), len(ps), key[1], key[2]) for key, ps in groups.items()}
        where = {p: (key, g) for key, ps in groups.items() for g, p in enumerate(ps)}
        for path in chunk:  # PEFT's order, module by module then adapter by adapter: DARE's masks match
            key, g = where[path]
            for j, i in enumerate(key[0]):
                a, b, scale = parts[i][0][path]
                d = buffers[key][j, g]  # (out, in) = ΔW_i, computed as PEFT's get_delta_weight does
                torch.mm(b.float(), a.float(), out=d).mul_(scale)
                if prune and method.startswith("dare"):
                    d.mul_(torch.bernoulli(torch.full_like(d, density))).div_(density)  # merge_utils.prune
        for key, ps in groups.items():
            T = buffers[key]  # (n, G, out, in)
            if prune and method in ("ties", "magnitude_prune"):
                _magnitude_prune_(T, density)
            w = [parts[i][1] for i in key[0]]
            if method in ("ties", "dare_ties"):
                delta = _disjoint_merge(T, w, majority_sign_method)
            else:  # magnitude_prune, dare_linear: task arithmetic, Σ_i w_i·T_i (merge_utils.task_arithmetic)
                delta = functools.reduce(
                    operator.add, (t.mul_(wi) for t, wi in zip(T.unbind(0), w, strict=True))
                )
            A, B = _top_k_svd(delta, key[3], key[4], svd_solver)
            a0, b0, _ = parts[key[0][0]][0][ps[0]]
            for g, path in enumerate(ps):
                out[path] = (A[g].to(a0.dtype).contiguous(), B[g].to(b0.dtype).contiguous())
    return {p: out[p] for p in paths}


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
    svd_solver: Literal["auto", "full"] = "auto",
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
        svd_solver: the rank truncation of ties / dare_* / magnitude_prune: ``auto`` (default) a block
            subspace iteration checked per matrix to fp32 round-off, LAPACK where it does not converge;
            ``full`` LAPACK's SVD of every ΔW, as PEFT (see ``_top_k_svd``).

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
    if svd_solver not in SVD_SOLVERS:
        raise ValueError(f"unknown svd_solver {svd_solver!r}; expected one of {list(SVD_SOLVERS)}")
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
            factors = _svd_factors(parts, method, rank, density, majority_sign_method, svd_solver)
    dropout = max(c.dropout for n in names for c in model.adapter_config(n))
    head_cfg = model.head_config(source) if source else None
    head_state = model.heads[source].state_dict() if source else None
    add_factors(model, into, factors, dropout=dropout, head=head_cfg, head_state=head_state)
    return into
