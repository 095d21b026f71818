"""Task samplers, loss weighting and gradient reversal, each checked against its formula."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from adapters_mtl.training import (
    DWA,
    GradNorm,
    PCGrad,
    StaticWeighting,
    TaskDiscriminator,
    TaskSampler,
    UncertaintyWeighting,
    grad_reverse,
    make_weighting,
)

SIZES = {"news": 2000, "tweets": 500, "tiny": 20}


@pytest.mark.parametrize("strategy,T", [("proportional", 1.0), ("temperature", 2.0), ("temperature", 5.0)])
def test_sampling_frequencies_match_the_formula(strategy, T):
    sampler = TaskSampler(SIZES, strategy, temperature=T, seed=1)
    expected = {t: n ** (1 / T) for t, n in SIZES.items()}
    z = sum(expected.values())
    expected = {t: v / z for t, v in expected.items()}
    assert sampler.probabilities() == pytest.approx(expected)
    n = 20000
    counts = Counter(sampler.sample() for _ in range(n))
    for t, p in expected.items():
        assert abs(counts[t] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (t, counts[t] / n, p)


def test_round_robin_and_annealed():
    rr = TaskSampler(SIZES, "round_robin")
    assert [rr.sample() for _ in range(6)] == ["news", "tweets", "tiny"] * 2
    ann = TaskSampler(SIZES, "annealed", total_steps=101)
    assert (
        ann.alpha(0) == 1.0 and ann.alpha(100) == pytest.approx(0.2) and ann.alpha(50) == pytest.approx(0.6)
    )
    assert ann.probabilities(0)["tiny"] < ann.probabilities(100)["tiny"]  # small tasks gain weight over time


def test_sampler_resumes_exactly_and_rejects_bad_input():
    a = TaskSampler(SIZES, "temperature", seed=3)
    [a.sample() for _ in range(17)]
    state = a.state_dict()
    rest = [a.sample() for _ in range(50)]
    b = TaskSampler(SIZES, "temperature", seed=99)
    b.load_state_dict(state)
    assert [b.sample() for _ in range(50)] == rest
    with pytest.raises(ValueError, match=r"task 'x' has size 0.*strategy 'zipf' is unknown"):
        TaskSampler({"x": 0}, "zipf")
    with pytest.raises(ValueError, match="annealed sampling needs total_steps"):
        TaskSampler(SIZES, "annealed")


def test_uncertainty_weights_move_as_the_formula_says():
    w = UncertaintyWeighting(["noisy", "clean"])
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    losses = {"noisy": torch.tensor(4.0), "clean": torch.tensor(0.25)}
    first = None
    for _ in range(400):
        opt.zero_grad()
        w.backward(losses)
        if first is None:  # d/ds [½e^{-s}L + ½s] at s=0 = ½(1 - L)
            assert w.log_vars.grad.tolist() == pytest.approx([0.5 * (1 - 4.0), 0.5 * (1 - 0.25)])
            first = True
        opt.step()
    # optimum s_i = log L_i: the noisy task ends with the smaller weight
    assert w.log_vars.tolist() == pytest.approx([math.log(4.0), math.log(0.25)], abs=0.05)
    weights = w.weights()
    assert weights["noisy"] < 0.5 < weights["clean"]


def test_dwa_weights_follow_the_loss_ratios():
    dwa = DWA(["a", "b"], temperature=2.0)
    assert dwa.weights() == {"a": 1.0, "b": 1.0}
    for epoch_losses in ({"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.9}):
        dwa.observe(epoch_losses)
        dwa.end_epoch()
    ra, rb = 0.5 / 1.0, 0.9 / 1.0
    za = math.exp(ra / 2) + math.exp(rb / 2)
    assert dwa.weights() == pytest.approx({"a": 2 * math.exp(ra / 2) / za, "b": 2 * math.exp(rb / 2) / za})
    assert dwa.weights()["b"] > dwa.weights()["a"]  # the task that improves slower gets more weight


def test_pcgrad_removes_the_conflicting_component():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    merged = PCGrad.project([g1, g2], order=[0, 1])
    # g1' = g1 - (g1·g2/|g2|²) g2 = [0.5, 0.5];  g2' = g2 - (g2·g1/|g1|²) g1 = [0, 1]
    assert merged.tolist() == pytest.approx([0.5, 1.5])
    assert torch.dot(torch.tensor([0.5, 0.5]), g2) == 0
    agree = PCGrad.project([g1, torch.tensor([1.0, 1.0])])
    assert agree.tolist() == [2.0, 1.0]  # no conflict: plain sum

    shared = torch.nn.Parameter(torch.zeros(2))
    own = torch.nn.Parameter(torch.ones(1))
    losses = {"a": shared @ g1 + own.sum(), "b": shared @ g2}
    PCGrad(["a", "b"], shuffle=False).backward(losses, [shared])
    assert shared.grad.tolist() == pytest.approx([0.5, 1.5])
    assert own.grad.tolist() == [1.0]  # task parameters keep their ordinary gradient


def test_gradnorm_lowers_the_weight_of_the_task_with_larger_gradients():
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 4)
    heads = torch.nn.ModuleDict({"big": torch.nn.Linear(4, 1), "small": torch.nn.Linear(4, 1)})
    gn = GradNorm(["big", "small"], alpha=1.0, lr=0.05)
    opt = torch.optim.SGD(list(shared.parameters()) + list(heads.parameters()), lr=1e-3)
    x = torch.randn(32, 4)
    for _ in range(30):
        opt.zero_grad()
        h = torch.tanh(shared(x))
        losses = {"big": 10 * heads["big"](h).pow(2).mean(), "small": 0.1 * heads["small"](h).pow(2).mean()}
        weights = gn.backward(losses, list(shared.parameters()))
        opt.step()
    assert weights["big"] < 1.0 < weights["small"]
    assert sum(weights.values()) == pytest.approx(2.0)


def test_static_weighting_and_factory():
    a = torch.nn.Parameter(torch.tensor(1.0))
    StaticWeighting(["x", "y"], {"x": 3.0}).backward({"x": a * 2, "y": a * 5})
    assert a.grad.item() == 3 * 2 + 1 * 5
    with pytest.raises(ValueError, match="unknown loss weighting 'magic'"):
        make_weighting("magic", ["x"])
    with pytest.raises(KeyError, match="unknown tasks"):
        StaticWeighting(["x"]).backward({"z": a * 1})


def test_gradient_reversal_flips_and_scales():
    x = torch.randn(3, 4, requires_grad=True)
    upstream = torch.randn(3, 4)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -0.3 * upstream)
    disc = TaskDiscriminator(4, 2, lambda_=0.5, dropout=0.0)
    shared = torch.randn(5, 4, requires_grad=True)
    disc.loss(shared, torch.tensor([0, 1, 0, 1, 1])).backward()
    ref = shared.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(disc.net(ref), torch.tensor([0, 1, 0, 1, 1])).backward()
    torch.testing.assert_close(shared.grad, -0.5 * ref.grad)  # the encoder sees the reversed gradient
