"""Soft parameter sharing (the penalty, its gradient, weight 0 == independent training) and torchjd's
gradient aggregators behind the weighting interface."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import shared_model, task_model, train_config, two_tasks

from adapters_mtl import LoraConfig
from adapters_mtl.training import JacobianAggregation, MultiTaskTrainer, make_weighting
from adapters_mtl.training.soft_sharing import check_soft_sharing, soft_sharing_penalty, start_alike
from adapters_mtl.training.weighting import AGGREGATORS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return two_tasks(tmp_path_factory.mktemp("tasks"))


def _own(model, task):
    return {k: p for k, p in model.adapter_parameters(task).items() if not k.startswith("heads.")}


def test_soft_penalty_value_and_gradient_follow_the_formula(setup):
    _, tasks, base = setup
    model = task_model(base, tasks)
    names = list(tasks)
    with torch.no_grad():  # B starts at zero: give every parameter a value
        for t in names:
            for p in _own(model, t).values():
                p.normal_()
    penalty = soft_sharing_penalty(model, names)
    params = [_own(model, t) for t in names]
    expected = 0.0
    for key in params[0]:
        mean = sum(ps[key] for ps in params) / len(names)
        expected += sum(((ps[key] - mean) ** 2).sum().item() for ps in params)
    assert penalty.item() == pytest.approx(expected / len(names), rel=1e-5)
    penalty.backward()
    for key in params[0]:  # d/dθ_t = (2/K)(θ_t − θ̄): the mean's own terms cancel
        mean = sum(ps[key].detach() for ps in params) / len(names)
        for ps in params:
            torch.testing.assert_close(ps[key].grad, 2 / len(names) * (ps[key].detach() - mean))
    assert all(p.grad is None for t in names for k, p in model.adapter_parameters(t).items() if "heads." in k)


def test_start_alike_and_refusals(setup):
    _, tasks, base = setup
    model = task_model(base, tasks)
    a, b = list(tasks)
    assert any(not torch.equal(p, _own(model, b)[k]) for k, p in _own(model, a).items())
    start_alike(model, [a, b])
    assert all(torch.equal(p, _own(model, b)[k]) for k, p in _own(model, a).items())
    assert soft_sharing_penalty(model, [a, b]).item() == 0.0
    with pytest.raises(ValueError, match="soft pulls several tasks' adapters together"):
        check_soft_sharing(model, [a])
    model.remove_adapter(b)
    model.add_adapter(b, LoraConfig(r=2, targets=("value",)), head=tasks[b].head_config())
    with pytest.raises(ValueError, match=r"same parameters.*\['mood'\] differ from 'topic'"):
        check_soft_sharing(model, [a, b])


def _train(setup, tmp_path, **kw):
    tok, tasks, base = setup
    model = task_model(base, tasks)
    start_alike(model, list(tasks))
    cfg = train_config(tmp_path, steps=12, eval_every=100, batching="mixed", **kw)
    trainer = MultiTaskTrainer(model, tok, tasks, cfg)
    trainer.train(stop_after=12)
    return model, trainer


def test_soft_weight_zero_is_independent_training_and_a_weight_pulls_adapters_together(setup, tmp_path):
    names = list(setup[1])
    independent, _ = _train(setup, tmp_path / "a", sharing="none")
    zero, _ = _train(setup, tmp_path / "b", sharing="soft", soft_weight=0.0)
    for t in names:
        for k, p in independent.adapter_parameters(t).items():
            assert torch.equal(p, zero.adapter_parameters(t)[k]), k
    pulled, trainer = _train(setup, tmp_path / "c", sharing="soft", soft_weight=50.0)
    assert all("loss/soft_sharing" in row for row in trainer.history)
    apart = soft_sharing_penalty(independent, names).item()
    together = soft_sharing_penalty(pulled, names).item()
    assert apart > 0 and together < 0.5 * apart, (apart, together)


def test_upgrad_keeps_every_task_improving_and_the_others_aggregate():
    shared = torch.nn.Parameter(torch.zeros(2))
    own = torch.nn.Parameter(torch.ones(1))
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # conflicting: g1·g2 < 0
    up = make_weighting("upgrad", ["a", "b"])
    assert isinstance(up, JacobianAggregation) and not up.weighted_sum
    weights = up.backward({"a": shared @ g1 + own.sum(), "b": shared @ g2}, [shared])
    step = shared.grad
    assert torch.dot(step, g1) >= -1e-6 and torch.dot(step, g2) >= -1e-6  # no task gets worse
    torch.testing.assert_close(step, weights["a"] * g1 + weights["b"] * g2)
    assert own.grad.tolist() == [1.0]  # task parameters keep their ordinary gradient
    shared.grad = None
    agree = make_weighting("upgrad", ["a", "b"])  # no conflict: the plain sum, as static weighting gives
    agree.backward({"a": shared @ g1, "b": shared @ torch.tensor([1.0, 1.0])}, [shared])
    torch.testing.assert_close(shared.grad, torch.tensor([2.0, 1.0]))
    shared.grad = None  # MGDA: K × the min-norm point of the hull, a·g1 + (1−a)·g2 with a = 0.6 here
    make_weighting("mgda", ["a", "b"]).backward({"a": shared @ g1, "b": shared @ g2}, [shared])
    torch.testing.assert_close(shared.grad, 2 * torch.tensor([0.2, 0.4]), atol=1e-4, rtol=0)
    for name in ("imtl_g", "aligned_mtl", "dualproj"):
        shared.grad = None
        w = make_weighting(name, ["a", "b"]).backward({"a": shared @ g1, "b": shared @ g2}, [shared])
        torch.testing.assert_close(shared.grad, w["a"] * g1 + w["b"] * g2)
    with pytest.raises(ValueError, match="got none: set sharing: shared"):
        make_weighting("mgda", ["a", "b"]).backward({"a": shared @ g1}, [])
    assert set(AGGREGATORS) >= {"upgrad", "mgda", "imtl_g", "aligned_mtl", "cagrad", "nash_mtl"}


def test_aggregators_take_rows_in_task_order_and_handle_a_missing_task():
    shared = torch.nn.Parameter(torch.zeros(2))
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # preferences follow the task list, whatever order the batch's losses come in
    w = make_weighting("upgrad", ["a", "b", "c"], pref_vector=[1.0, 3.0, 0.0])
    flipped = w.backward({"b": shared @ g2, "a": shared @ g1}, [shared])
    grad = shared.grad.clone()
    shared.grad = None
    w.backward({"a": shared @ g1, "b": shared @ g2}, [shared])
    torch.testing.assert_close(shared.grad, grad)
    assert list(flipped) == ["a", "b"]
    for pref, same in (([1.0, 3.0], True), ([3.0, 1.0], False)):  # the present tasks' preferences
        shared.grad = None
        make_weighting("upgrad", ["a", "b"], pref_vector=pref).backward(
            {"a": shared @ g1, "b": shared @ g2}, [shared]
        )
        assert torch.allclose(shared.grad, grad) == same
    shared.grad = None
    alone = make_weighting("upgrad", ["a", "b"]).backward({"b": shared @ g2}, [shared])
    assert alone == {"b": 1.0} and shared.grad.tolist() == g2.tolist()  # one task: its own gradient
    with pytest.raises(
        ValueError, match=r"pref_vector must list one number per task in the order \['a', 'b'\]"
    ):
        make_weighting("upgrad", ["a", "b"], pref_vector=[1.0])


def test_solver_aggregators_without_cvxpy_say_what_to_install():
    pytest.importorskip("torchjd")
    try:
        import cvxpy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"torchjd\[full\]"):
            make_weighting("cagrad", ["a", "b"])
    else:
        assert isinstance(make_weighting("cagrad", ["a", "b"]), JacobianAggregation)


def test_upgrad_trains_a_shared_adapter_run(setup, tmp_path):
    tok, tasks, base = setup
    model = shared_model(base, tasks)
    trainer = MultiTaskTrainer(
        model,
        tok,
        tasks,
        train_config(tmp_path, batching="mixed", sharing="shared", weighting="upgrad", steps=30),
    )
    shared_before = copy.deepcopy({k: p.detach() for k, p in model.adapter_parameters("shared").items()})
    trainer.train(stop_after=29)
    assert any(not torch.equal(p, shared_before[k]) for k, p in model.adapter_parameters("shared").items())
    for t in tasks:
        losses = [h[f"loss/{t}"] for h in trainer.history if f"loss/{t}" in h]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"{t} loss did not go down: {losses}"
        assert all(h[f"weight/{t}"] > 0 for h in trainer.history if f"weight/{t}" in h)
    weights = [h[f"weight/{t}"] for h in trainer.history for t in tasks if f"weight/{t}" in h]
    assert any(abs(w - 1.0) > 1e-3 for w in weights)  # UPGrad did reweigh conflicting steps
