"""ties / dare_* / magnitude_prune against PEFT's ``add_weighted_adapter`` (``*_svd``: the same ΔW-space
combination) on one tiny model, and the fast rank truncation against LAPACK."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny

from adapters_mtl import AdapterModel, LoraConfig
from adapters_mtl.files.folder import save_adapter
from adapters_mtl.serving import merging
from adapters_mtl.serving.merging import merge_adapters

PRUNED = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Ours and PEFT holding the same two adapters (ranks 4 and 2, rsLoRA, a module only one has), on a
    model wide enough (q 128×128, v 64×128) for the subspace iteration rather than LAPACK."""
    import peft

    base = tiny("llama", hidden_size=128, intermediate_size=96)
    model = AdapterModel(copy.deepcopy(base)).eval()
    torch.manual_seed(3)
    model.add_adapter("x", LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), init="random"))
    model.add_adapter(
        "y", LoraConfig(r=2, alpha=4, targets=("q_proj", "v_proj"), init="random", use_rslora=True)
    )
    tmp = tmp_path_factory.mktemp("adapters")
    for name in ("x", "y"):
        save_adapter(model, name, tmp / name)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "x"), adapter_name="x")
    ref.load_adapter(str(tmp / "y"), adapter_name="y")
    return model, ref.eval()


def _deltas(model, name):
    return {path: scale * (B @ A) for path, (A, B, scale) in model.factors(name).items()}


def _peft_delta(ref, path, name):
    return ref.base_model.model.get_submodule(path).get_delta_weight(name)


@pytest.mark.parametrize("solver", ["auto", "full"])
@pytest.mark.parametrize("method", PRUNED)
def test_pruned_merges_equal_peft_add_weighted_adapter(pair, method, solver, monkeypatch):
    model, ref = pair
    into = f"{method}_{solver}"
    # DARE's masks come from the global RNG, which PEFT's new adapter also draws from for its (discarded)
    # init: the i-th torch.bernoulli call gets the same generator on both sides, so the i-th module and
    # adapter (PEFT's order) must get the same mask.
    bernoulli, calls = torch.bernoulli, []

    def counted(p):
        calls.append(p.shape)
        return bernoulli(p, generator=torch.Generator().manual_seed(len(calls)))

    monkeypatch.setattr(torch, "bernoulli", counted)
    ref.add_weighted_adapter(["x", "y"], [0.6, -0.4], into, combination_type=f"{method}_svd", density=0.5)
    drawn = len(calls)
    calls.clear()
    merge_adapters(model, ["x", "y"], [0.6, -0.4], method, into=into, density=0.5, seed=5, svd_solver=solver)
    assert len(calls) == drawn == (10 if method.startswith("dare") else 0)  # x at 6 modules, y at 4
    ours = _deltas(model, into)
    assert len(ours) == 6  # q, v, down of 2 layers
    for path, got in ours.items():
        want = _peft_delta(ref, path, into)
        # fp32 round-off of a rank-4 truncation: LAPACK in float32 vs float64 differs by up to ~1e-5 of max|ΔW|
        torch.testing.assert_close(got, want, atol=2e-5 * want.abs().max().item(), rtol=0)
        assert want.abs().max() > 0 and torch.linalg.matrix_rank(got) == 4


def test_dare_is_reproducible_with_its_seed_and_leaves_the_global_rng_alone(pair):
    model, _ = pair
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    for into, seed in (("d1", 7), ("d2", 7), ("d3", 8)):
        merge_adapters(model, ["x", "y"], [0.5, 0.5], "dare_ties", into=into, density=0.3, seed=seed)
    assert torch.equal(torch.random.get_rng_state(), state)
    d1, d2, d3 = (_deltas(model, n) for n in ("d1", "d2", "d3"))
    for path in d1:
        torch.testing.assert_close(d1[path], d2[path], atol=0, rtol=0)
        assert (d1[path] - d3[path]).abs().max() > 1e-3 * d1[path].abs().max()


def _matrix(m, n, s, seed):
    """A (m, n) float64 matrix with singular values ``s`` (descending) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return (U * s) @ V.T


def _truncate(D, k):
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return (U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]


@pytest.mark.parametrize("spectrum", ["gap", "flat"])
def test_subspace_truncation_matches_exact_svd_and_falls_back_without_a_gap(spectrum, monkeypatch):
    """With a gap (12 values in [1, 2] above a floor ≤ 0.2, like pruned ΔW: merged ranks above noise) the
    iteration converges; on a flat spectrum (1 down to 0.9) it cannot, and LAPACK takes over. Both give
    the exact (float64) truncation to fp32 round-off."""
    g = torch.Generator().manual_seed(0)
    if spectrum == "gap":
        s = torch.cat([1 + torch.rand(12, generator=g), 0.2 * torch.rand(84, generator=g)]).double()
    else:
        s = torch.linspace(1.0, 0.9, 96, dtype=torch.float64)
    D64 = torch.stack([_matrix(96, 160, s.sort(descending=True).values, seed) for seed in range(3)])
    D = D64.float()
    calls = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda X, **kw: calls.append(tuple(X.shape)) or svd(X, **kw))
    # private: a chosen spectrum (to force the fallback) cannot be reached through merge_adapters
    A, B = merging._top_k_svd(D, 8, 20, "auto")  # noqa: SLF001
    assert ((3, 96, 160) in calls) == (spectrum == "flat"), calls  # the LAPACK fallback
    assert len(calls) <= merging._MAX_ITER  # noqa: SLF001
    want = _truncate(D64, 8)
    err = ((B @ A).double() - want).abs().max().item()
    lapack = (_truncate(D, 8).double() - want).abs().max().item()
    assert err < max(4 * lapack, 1e-6), (err, lapack)


def test_kth_largest_is_topks_last_value_and_pruning_keeps_exactly_k():
    """The sampled bracket + band selection is exact (a wrong index would be hidden by the topk fallback
    of the pruning, so it is checked on its own), on smooth rows and on rows of few distinct values."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.randn(3, 50_000, generator=g).abs()
    few = torch.randint(0, 5, (3, 50_000), generator=g).float()
    for mag in (smooth, few):
        for k in (1, 137, 25_000, 49_999):
            want = torch.topk(mag, k, dim=1).values[:, -1:]
            assert torch.equal(merging._kth_largest(mag, k), want), k  # noqa: SLF001
    T = torch.randint(-3, 4, (2, 40, 50), generator=g).float()  # many ties at the threshold
    pruned = T.clone()
    merging._magnitude_prune_(pruned, 0.3)  # noqa: SLF001
    from peft.utils.merge_utils import magnitude_based_pruning

    for got, t in zip(pruned, T, strict=True):  # PEFT's topk choice among the tied values, exactly
        assert torch.equal(got, magnitude_based_pruning(t, 0.3))
