"""Checkpoints: every loss weighting carries its whole state through state_dict(), the on-disk layout stays
what earlier versions wrote (and read), and a resumed run continues exactly like an uninterrupted one."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from helpers import shared_model, task_model, train_config, two_tasks
from safetensors.torch import load_file, save_file
from torch import nn

from adapters_mtl.training import LossWeighting, MultiTaskTrainer, make_weighting
from adapters_mtl.training.weighting import AGGREGATORS, WEIGHTINGS

TASKS = ["a", "b", "c"]
ARGS = {"static": {"weights": {"a": 2.0}}, "gradnorm": {"lr": 0.05}}
# the keys of each method's state: part of the checkpoint format (old checkpoints must stay readable)
STATE_KEYS = {
    "static": set(),
    "uncertainty": {"log_vars"},
    "dwa": {"history", "_sums", "_counts"},
    "gradnorm": {"w", "initial", "optimizer.step", "optimizer.exp_avg", "optimizer.exp_avg_sq"},
    "pcgrad": {"rng"},
    **{name: set() for name in AGGREGATORS},  # torchjd's aggregators keep no state between steps
}


def _toy(seed: int = 0) -> tuple[nn.Module, nn.ModuleDict]:
    torch.manual_seed(seed)
    return nn.Linear(4, 4), nn.ModuleDict({t: nn.Linear(4, 1) for t in TASKS})


def _steps(weighting: LossWeighting, shared: nn.Module, heads: nn.ModuleDict, xs: list) -> list:
    """Train the toy model a few steps; returns per step the weights and the shared gradients."""
    opt = torch.optim.SGD([*shared.parameters(), *heads.parameters(), *weighting.parameters()], lr=0.05)
    out = []
    for x in xs:
        opt.zero_grad()
        h = torch.tanh(shared(x))
        # conflicting targets of different scales: every method's weights and projections move
        losses = {t: (k + 1) * (heads[t](h) - (-1) ** k * (k + 1)).pow(2).mean() for k, t in enumerate(TASKS)}
        weights = weighting.backward(losses, list(shared.parameters()))
        out.append((dict(weights), [p.grad.clone() for p in shared.parameters()]))
        opt.step()
        weighting.end_epoch()
    return out


def _through_disk(state: dict, tmp_path) -> dict:
    """``state`` as a checkpoint stores it: tensors in safetensors, the rest in JSON."""
    save_file({k: v for k, v in state.items() if torch.is_tensor(v)}, str(tmp_path / "w.safetensors"))
    plain = json.loads(json.dumps({k: v for k, v in state.items() if not torch.is_tensor(v)}))
    return {**plain, **load_file(str(tmp_path / "w.safetensors"))}


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_every_weighting_continues_exactly_from_its_state_dict(name, tmp_path):
    if name in ("cagrad", "nash_mtl"):
        pytest.importorskip("cvxpy", reason="torchjd's CAGrad and Nash-MTL need cvxpy (torchjd[full])")
    if name == "nash_mtl":
        pytest.skip(
            "Nash-MTL's warm start between steps is not checkpointed (documented in JacobianAggregation)"
        )
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 4, generator=gen) for _ in range(6)]
    first = make_weighting(name, TASKS, **ARGS.get(name, {}))
    assert isinstance(first, LossWeighting)
    shared, heads = _toy()
    _steps(first, shared, heads, xs[:3])
    state = first.state_dict()
    assert set(state) == STATE_KEYS[name]
    # another seed where the method has one: the state, not the construction, must decide what follows
    other = {**ARGS.get(name, {}), **({"seed": 99} if name == "pcgrad" else {})}
    resumed, fresh = make_weighting(name, TASKS, **other), make_weighting(name, TASKS, **other)
    resumed.load_state_dict(_through_disk(state, tmp_path))
    want = _steps(first, *copy.deepcopy((shared, heads)), xs[3:])
    got = _steps(resumed, *copy.deepcopy((shared, heads)), xs[3:])
    for (w_want, g_want), (w_got, g_got) in zip(want, got, strict=True):
        assert w_got == w_want
        for a, b in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    if STATE_KEYS[name]:  # the state matters: without it the run goes elsewhere
        other_run = _steps(fresh, *copy.deepcopy((shared, heads)), xs[3:])
        assert any(
            w != w_want or any(not torch.equal(a, b) for a, b in zip(g, g_want, strict=True))
            for (w, g), (w_want, g_want) in zip(other_run, want, strict=True)
        )


def test_weighting_interface_and_unknown_state():
    for name in WEIGHTINGS:
        try:
            method = make_weighting(name, TASKS)
        except ImportError:  # CAGrad / Nash-MTL without cvxpy: tested in test_soft_sharing_and_aggregators
            continue
        if not method.weighted_sum:  # per-task gradient methods have no weighted sum to backward
            with pytest.raises(NotImplementedError, match="call backward"):
                method.total({"a": torch.tensor(1.0)})
        with pytest.raises(KeyError, match="has no state"):
            method.load_state_dict({"bogus": 1})
    old = make_weighting("gradnorm", TASKS)  # a checkpoint from before the optimiser moments were saved
    old.load_state_dict({"w": torch.tensor([0.5, 1.0, 1.5]), "initial": {"a": 2.0}})
    assert old.w.tolist() == [0.5, 1.0, 1.5] and old.initial == {"a": 2.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return two_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.mark.parametrize("weighting,sharing", [("dwa", "none"), ("gradnorm", "shared"), ("pcgrad", "shared")])
def test_resumed_run_continues_exactly_and_keeps_the_checkpoint_layout(tmp_path, setup, weighting, sharing):
    tok, tasks, base = setup
    make = task_model if sharing == "none" else shared_model
    kw = dict(steps=6, batch_size=8, batching="mixed", weighting=weighting, sharing=sharing, eval_every=2)
    full_model = make(base, tasks)
    full = MultiTaskTrainer(full_model, tok, tasks, train_config(tmp_path / "a", **kw))
    full.train()
    MultiTaskTrainer(
        make(base, tasks), tok, tasks, train_config(tmp_path / "b", checkpoint_every=3, **kw)
    ).train(stop_after=4)
    checkpoint = tmp_path / "b" / "run" / "checkpoint"

    # the layout earlier versions wrote and read
    meta = json.loads((checkpoint / "trainer_state.json").read_text())
    assert set(meta) == {"step", "sampler", "streams", "best", "history", "config", "weighting"}
    assert meta["step"] == 3 and len(meta["history"]) == 3 and set(meta["streams"]) == set(tasks)
    tensors = load_file(str(checkpoint / "state.safetensors"))
    assert {k.split("::")[0] for k in tensors} == {"param", "optim", "rng", "best", "weighting"} - (
        set() if weighting == "gradnorm" else {"weighting"}
    )
    assert (
        set(meta["weighting"]) | {k.split("::", 1)[1] for k in tensors if k.startswith("weighting::")}
        == (STATE_KEYS[weighting])
    )

    resumed_model = make(base, tasks)
    resumed = MultiTaskTrainer(resumed_model, tok, tasks, train_config(tmp_path / "b", **kw))
    result = resumed.train(resume_from=checkpoint)
    assert result["step"] == 6 and len(resumed.history) == len(full.history)
    for got, want in zip(resumed.history, full.history, strict=True):  # losses, weights, validation
        assert got.keys() == want.keys() and got == pytest.approx(want, abs=1e-6), got["step"]
    for t in tasks:
        want, got = full_model.adapter_parameters(t), resumed_model.adapter_parameters(t)
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=f"{t}:{k}")

    if weighting in ("gradnorm", "pcgrad"):  # a checkpoint from before their whole state was saved resumes
        old = tmp_path / "old"
        shutil.copytree(checkpoint, old)
        meta["weighting"].pop("rng", None)
        (old / "trainer_state.json").write_text(json.dumps(meta))
        save_file(
            {k: v for k, v in tensors.items() if "::optimizer." not in k}, str(old / "state.safetensors")
        )
        again = MultiTaskTrainer(make(base, tasks), tok, tasks, train_config(tmp_path / "c", **kw))
        assert again.train(resume_from=old)["step"] == 6
