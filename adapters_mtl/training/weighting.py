"""Loss weighting for multi-task training, behind one base class, :class:`LossWeighting`.

A trainer calls, per step, either ``total(losses)`` (methods whose result is one weighted sum:
``weighted_sum`` is True) and backwards that itself (through Accelerate, so the loss is scaled under fp16),
or ``backward(losses, shared)`` (methods that work on per-task gradients: the method runs the backward
pass). Either way ``last`` then holds the weights used. ``end_epoch()`` closes a window of steps (DWA's
"epoch"); ``trainable_parameters()`` are what the trainer's optimiser must update (uncertainty's
``log σ²``); ``state_dict()`` / ``load_state_dict()`` carry everything that changes while training, so a
resumed run continues exactly. ``shared`` are the parameters shared by all tasks (e.g. a shared adapter);
GradNorm and PCGrad work on their gradients only, task adapters and heads get their ordinary gradients.

  static       Σ w_i L_i with fixed w_i
  uncertainty  Σ ½·exp(-s_i)·L_i + ½·s_i, s_i = log σ_i² learned (Kendall, Gal & Cipolla 2018)
  dwa          w_i = K·softmax_i(r_i / T), r_i = L̄_i(e-1) / L̄_i(e-2) over epochs (Liu, Johns & Davison 2019)
  gradnorm     learned w_i pulling each task's gradient norm on `shared` towards mean·(L̃_i / mean L̃)^α
               (Chen et al. 2018), w renormalised to sum to K
  pcgrad       per-task gradients on `shared`; a gradient conflicting with another (negative dot product)
               loses its component along it (Yu et al. 2020)
  upgrad, mgda, imtl_g, aligned_mtl, dualproj, cagrad, nash_mtl
               torchjd's aggregators of the per-task gradients on `shared` (the K×P Jacobian): UPGrad
               (Quinton & Rey 2024), MGDA (Désidéri 2012; Sener & Koltun 2018), IMTL-G (Liu et al. 2021),
               Aligned-MTL (Senushkin et al. 2023), DualProj, CAGrad (Liu et al. 2021) and Nash-MTL (Navon
               et al. 2022); the last two need cvxpy (``pip install "torchjd[full]"``)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn

__all__ = [
    "AGGREGATORS",
    "DWA",
    "WEIGHTINGS",
    "GradNorm",
    "JacobianAggregation",
    "LossWeighting",
    "PCGrad",
    "StaticWeighting",
    "UncertaintyWeighting",
    "make_weighting",
    "needs_shared",
]

Losses = Mapping[str, torch.Tensor]


class LossWeighting:
    """What every loss weighting method offers a trainer.

    State values are tensors or JSON-able values (a checkpoint stores the first as safetensors and the
    rest as JSON); their keys are part of the checkpoint format, so keep them when changing a method.

    Attributes:
        tasks: the task names the method was built for.
        weighted_sum: True when the weighted loss is one sum (:meth:`total`) a trainer may backward itself;
            False when only :meth:`backward` can run the backward pass (it needs per-task gradients).
        last: ``{task: weight}`` used by the last :meth:`total` or :meth:`backward` call.
    """

    weighted_sum: ClassVar[bool] = True

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        self.last: dict[str, float] = {}

    def total(self, losses: Losses) -> torch.Tensor:
        """The weighted sum of the per-task ``losses`` (scalar tensors); records the weights in ``last``.

        Raises:
            KeyError: a loss for a task this method was not built for.
            NotImplementedError: the method is not a weighted sum (``weighted_sum`` is False).
        """
        raise NotImplementedError(
            f"{type(self).__name__} works on per-task gradients and has no weighted sum: call backward()"
        )

    def backward(self, losses: Losses, shared: Sequence[nn.Parameter] = ()) -> dict[str, float]:
        """Run the backward pass of ``losses`` (gradients add to ``.grad``); returns the weights used.

        Args:
            losses: ``{task: scalar loss}``.
            shared: the parameters every task shares (used by methods that work on per-task gradients).
        """
        del shared  # a weighted sum gives every parameter, shared or not, the gradient of the one sum
        self.total(losses).backward()
        return self.last

    def end_epoch(self) -> None:
        """Close a window of steps (a trainer calls this after each evaluation); most methods ignore it."""

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters the trainer's optimiser must update, by name (none for most methods)."""
        return {}

    def parameters(self) -> list[nn.Parameter]:
        """:meth:`trainable_parameters` as a list (e.g. for ``torch.optim.Adam(weighting.parameters())``)."""
        return list(self.trainable_parameters().values())

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes while training: ``{key: tensor or JSON-able value}``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; keys it lacks keep their current value (older checkpoints).

        Raises:
            KeyError: a key this method does not know.
        """
        unknown = sorted(set(state) - set(self.state_dict()))
        if unknown:
            raise KeyError(
                f"{type(self).__name__} has no state {unknown}; it keeps {sorted(self.state_dict())}: "
                "was the checkpoint written with another weighting?"
            )

    def _check(self, losses: Losses) -> None:
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise KeyError(f"losses for unknown tasks {unknown}; this weighting was built for {self.tasks}")


class StaticWeighting(LossWeighting):
    """Fixed weights (default 1 for every task)."""

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__(tasks)
        self.w = {t: float((weights or {}).get(t, 1.0)) for t in self.tasks}

    def total(self, losses: Losses) -> torch.Tensor:
        self._check(losses)
        self.last = {t: self.w[t] for t in losses}
        return cast(torch.Tensor, sum(self.w[t] * loss for t, loss in losses.items()))


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic-uncertainty weighting with one learned ``log σ²`` per task (a trainer adds
    :meth:`trainable_parameters` to its optimiser). At the optimum ``s_i = log L_i``: noisier tasks get
    smaller weights."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))  # (K,)

    def total(self, losses: Losses) -> torch.Tensor:
        self._check(losses)
        out: torch.Tensor | float = 0.0
        for t, loss in losses.items():
            s = self.log_vars[self.tasks.index(t)]
            out = out + 0.5 * torch.exp(-s) * loss + 0.5 * s
        self.last = self.weights(list(losses))
        return cast(torch.Tensor, out)

    def weights(self, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """``{task: ½·exp(-s_i)}`` for ``tasks`` (default: all)."""
        return {t: 0.5 * math.exp(-self.log_vars[self.tasks.index(t)].item()) for t in (tasks or self.tasks)}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {"log_vars": self.log_vars}

    def state_dict(self) -> dict[str, Any]:
        return {"log_vars": self.log_vars.detach().clone()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "log_vars" in state:
            self.log_vars.copy_(state["log_vars"])


class DWA(LossWeighting):
    """Dynamic weight average: call :meth:`observe` with each step's losses and :meth:`end_epoch` at the
    end of each epoch (or any fixed window); weights are 1 for the first two epochs."""

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        self.T = float(temperature)
        self.history: list[dict[str, float]] = []  # mean loss per task, per finished epoch
        self._sums = {t: 0.0 for t in self.tasks}
        self._counts = {t: 0 for t in self.tasks}

    def weights(self) -> dict[str, float]:
        """``{task: weight}`` for the current epoch."""
        if len(self.history) < 2:
            return {t: 1.0 for t in self.tasks}
        prev, prev2 = self.history[-1], self.history[-2]
        r = {t: prev[t] / max(prev2[t], 1e-12) for t in self.tasks}
        z = sum(math.exp(r[t] / self.T) for t in self.tasks)
        return {t: len(self.tasks) * math.exp(r[t] / self.T) / z for t in self.tasks}

    def observe(self, losses: Mapping[str, float | torch.Tensor]) -> None:
        """Add one step's losses to the current epoch's means."""
        for t, loss in losses.items():
            self._sums[t] += float(loss)
            self._counts[t] += 1

    def end_epoch(self) -> None:
        self.history.append({t: self._sums[t] / max(self._counts[t], 1) for t in self.tasks})
        self._sums = {t: 0.0 for t in self.tasks}
        self._counts = {t: 0 for t in self.tasks}

    def total(self, losses: Losses) -> torch.Tensor:
        self._check(losses)
        w = self.weights()
        self.observe({t: loss.detach() for t, loss in losses.items()})
        self.last = {t: w[t] for t in losses}
        return cast(torch.Tensor, sum(w[t] * loss for t, loss in losses.items()))

    def state_dict(self) -> dict[str, Any]:
        # the keys of the checkpoint format since the first release (hence the underscores)
        return {
            "history": [dict(h) for h in self.history],
            "_sums": dict(self._sums),
            "_counts": dict(self._counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = [dict(h) for h in state.get("history", self.history)]
        self._sums = dict(state.get("_sums", self._sums))
        self._counts = dict(state.get("_counts", self._counts))


def _task_grads(losses: Losses, shared: Sequence[nn.Parameter]) -> dict[str, tuple[torch.Tensor | None, ...]]:
    return {
        t: torch.autograd.grad(loss, list(shared), retain_graph=True, allow_unused=True)
        for t, loss in losses.items()
    }


def _replace_shared_gradient(
    losses: Losses,
    shared: Sequence[nn.Parameter],
    combine: Callable[[list[torch.Tensor]], torch.Tensor],
) -> None:
    """Backward ``losses`` with the shared parameters' gradient ``combine(per-task flat gradients)``
    instead of their sum; every other parameter gets its ordinary gradient Σ_i ∇L_i. Gradients already in
    ``.grad`` (earlier accumulation steps, an adversarial loss) are kept."""
    per_task = _task_grads(losses, shared)
    flat = [
        torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, shared, strict=True)
            ]
        )
        for grads in per_task.values()
    ]
    merged = combine(flat)  # (P,)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # autograd.grad bypasses DDP's hooks: average the processes' combined gradients (each combined
        # its own batch's), so the shared adapter's replicas stay identical
        torch.distributed.all_reduce(merged)
        merged /= torch.distributed.get_world_size()
    before = [p.grad.clone() if p.grad is not None else None for p in shared]
    cast(torch.Tensor, sum(losses.values())).backward()  # task-specific parameters: ordinary gradients
    offset = 0
    for p, prior in zip(shared, before, strict=True):  # shared: the combined gradient replaces Σ_i g_i
        n = p.numel()
        p.grad = merged[offset : offset + n].view_as(p).to(p.dtype)
        if prior is not None:
            p.grad += prior
        offset += n


class GradNorm(LossWeighting):
    """GradNorm with its own small optimiser for the task weights (so it is self-contained).

    Args:
        tasks: task names.
        alpha: restoring-force strength (paper: 0.5–2; 1.5 default).
        lr: learning rate of the weights.
    """

    weighted_sum = False

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(tasks)
        self.alpha = alpha
        self.w = nn.Parameter(torch.ones(len(self.tasks)))  # (K,)
        self.initial: dict[str, float] = {}
        self._opt = torch.optim.Adam([self.w], lr=lr)

    def backward(self, losses: Losses, shared: Sequence[nn.Parameter] = ()) -> dict[str, float]:
        self._check(losses)
        if not shared:
            raise ValueError("GradNorm needs the shared parameters (their gradient norms are balanced)")
        names = list(losses)
        idx = [self.tasks.index(t) for t in names]
        for t, loss in losses.items():
            self.initial.setdefault(t, max(loss.item(), 1e-12))
        # ‖∇(w_i·L_i)‖ = w_i·‖∇L_i‖ (w_i > 0), so the norms are differentiable in w without a second-order
        # backward through the model (which CPU attention kernels do not implement)
        grads = _task_grads(losses, shared)
        raw = torch.stack(
            [
                torch.sqrt(
                    cast(torch.Tensor, sum((g.detach() ** 2).sum() for g in grads[t] if g is not None))
                )
                for t in names
            ]
        )
        norms = self.w[idx] * raw.to(self.w.device)
        ratios = torch.tensor([losses[t].item() / self.initial[t] for t in names])
        target = (norms.mean() * (ratios / ratios.mean()) ** self.alpha).detach()
        (grad_w,) = torch.autograd.grad((norms - target).abs().sum(), [self.w], retain_graph=True)
        total = cast(
            torch.Tensor, sum(self.w[i].detach() * losses[t] for t, i in zip(names, idx, strict=True))
        )
        total.backward()
        self._opt.zero_grad(set_to_none=True)
        self.w.grad = grad_w
        self._opt.step()
        with torch.no_grad():  # renormalise: weights stay positive and sum to the number of tasks
            self.w.clamp_(min=1e-3)
            self.w.mul_(len(self.tasks) / self.w.sum())
        self.last = {t: self.w[i].item() for t, i in zip(names, idx, strict=True)}
        return self.last

    def state_dict(self) -> dict[str, Any]:
        # "w" and "initial" are the checkpoint format's keys since the first release; the optimiser's
        # moments (Adam's "step", "exp_avg", "exp_avg_sq" of w) came later, as "optimizer.<name>"
        moments = self._opt.state.get(self.w, {})
        return {
            "w": self.w.detach().clone(),
            "initial": dict(self.initial),
            **{f"optimizer.{k}": v.detach().clone() if torch.is_tensor(v) else v for k, v in moments.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(k for k in state if k not in ("w", "initial") and not k.startswith("optimizer."))
        if unknown:
            raise KeyError(
                f"GradNorm has no state {unknown}: was the checkpoint written with another weighting?"
            )
        if "w" in state:
            self.w.copy_(state["w"])
        self.initial = dict(state.get("initial", self.initial))
        moments = {
            k[len("optimizer.") :]: v.clone() if torch.is_tensor(v) else v
            for k, v in state.items()
            if k.startswith("optimizer.")
        }
        if moments:  # checkpoints before the moments were saved: the optimiser starts afresh, as it did
            self._opt.state[self.w] = moments


class PCGrad(LossWeighting):
    """Projecting conflicting gradients on the shared parameters; other parameters get Σ_i ∇L_i."""

    weighted_sum = False

    def __init__(self, tasks: Sequence[str], seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(tasks)
        self.shuffle = shuffle
        self._rng = random.Random(seed)

    @staticmethod
    def project(grads: list[torch.Tensor], order: Sequence[int] | None = None) -> torch.Tensor:
        """Σ_i g_i', where g_i' has the component along each g_j (j ≠ i, in ``order``) removed if g_i'·g_j < 0.

        Args:
            grads: flat per-task gradients (each (P,)).
            order: the order the other gradients are projected out in (default: as given).

        Returns:
            (P,) the sum of the projected gradients.
        """
        out = []
        for i, g in enumerate(grads):
            g = g.clone()
            for j in order if order is not None else range(len(grads)):
                if j == i:
                    continue
                dot = torch.dot(g, grads[j])
                if dot < 0:
                    g -= dot / grads[j].pow(2).sum().clamp(min=1e-20) * grads[j]
            out.append(g)
        return torch.stack(out).sum(0)

    def backward(self, losses: Losses, shared: Sequence[nn.Parameter] = ()) -> dict[str, float]:
        self._check(losses)
        if not shared:
            raise ValueError("PCGrad needs the shared parameters (gradient surgery applies to them only)")
        order = list(range(len(losses)))
        if self.shuffle:
            self._rng.shuffle(order)
        _replace_shared_gradient(losses, shared, lambda flat: self.project(flat, order))
        self.last = {t: 1.0 for t in losses}
        return self.last

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss]}  # the shuffling order's RNG, as JSON

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "rng" in state:  # checkpoints before it was saved: the RNG continues from its seed, as it did
            version, internal, gauss = state["rng"]
            self._rng.setstate((version, tuple(internal), gauss))


class JacobianAggregation(LossWeighting):
    """One of torchjd's weighted aggregators of the per-task gradients on the shared parameters.

    torchjd (maintained, tested against the papers' code) computes the task weights ``w`` from the K×P
    Jacobian ``J`` of the shared parameters; the shared gradient becomes ``K·wᵀJ`` (the factor K makes a
    step without conflict the size of a static run's Σ_i ∇L_i: UPGrad's and MGDA's weights sum to about 1).
    Task-specific parameters (task adapters, heads) get their ordinary gradients; ``last`` holds ``K·w``.

    The Jacobian's rows are in ``tasks`` order; a batch without some task aggregates the tasks it has
    (Nash-MTL, whose solver is built for all K tasks, takes the plain sum for such a step). Nash-MTL's
    warm start between steps is not in :meth:`state_dict`: a resumed Nash-MTL run restarts it.

    Args:
        tasks: task names.
        aggregator: a key of :data:`AGGREGATORS`.
        **kwargs: the torchjd aggregator's own arguments (e.g. ``c`` for CAGrad, ``max_norm`` for Nash-MTL;
            ``pref_vector`` as a list in ``tasks`` order).

    Raises:
        ImportError: the aggregator needs a solver torchjd installs as an extra (CAGrad, Nash-MTL: cvxpy).
    """

    weighted_sum = False

    def __init__(self, tasks: Sequence[str], aggregator: str = "upgrad", **kwargs: Any) -> None:
        super().__init__(tasks)
        from torchjd import aggregation

        if aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {aggregator!r}; expected one of {sorted(AGGREGATORS)}")
        cls_name, defaults = AGGREGATORS[aggregator]
        args = {**defaults, **kwargs}
        if "n_tasks" in args:
            args["n_tasks"] = len(self.tasks)
        pref = args.pop("pref_vector", None)
        if pref is not None and (not isinstance(pref, (list, tuple)) or len(pref) != len(self.tasks)):
            raise ValueError(
                f"pref_vector must list one number per task in the order {self.tasks}, got {pref!r}"
            )
        self.pref = None if pref is None else dict(zip(self.tasks, map(float, pref), strict=True))
        self._make = lambda **extra: getattr(aggregation, cls_name)(**args, **extra)
        try:
            self.aggregator = self._make()
        except ImportError as e:
            raise ImportError(
                f"the {aggregator!r} weighting needs torchjd's optional solver ({e}); install it with "
                '`pip install "torchjd[full]"`, or pick upgrad, mgda, imtl_g, aligned_mtl or dualproj'
            ) from e
        self.name = aggregator

    def backward(self, losses: Losses, shared: Sequence[nn.Parameter] = ()) -> dict[str, float]:
        self._check(losses)
        if not shared:
            raise ValueError(
                f"the {self.name!r} weighting aggregates per-task gradients of the shared parameters and "
                "got none: set sharing: shared"
            )
        ordered = {t: losses[t] for t in self.tasks if t in losses}  # the Jacobian's rows: task order
        k = len(ordered)
        weights = torch.ones(k)
        aggregator = self.aggregator
        if self.pref is not None:  # the preferences of the tasks present, on the gradients' device
            device = next(iter(ordered.values())).device
            aggregator = self._make(pref_vector=torch.tensor([self.pref[t] for t in ordered], device=device))
        plain_sum = k == 1 or (self.name == "nash_mtl" and k < len(self.tasks))

        def combine(flat: list[torch.Tensor]) -> torch.Tensor:
            nonlocal weights
            jacobian = torch.stack(flat).float()  # (k, P)
            if plain_sum:  # one task (nothing to aggregate), or Nash-MTL without all its tasks
                return jacobian.sum(0)
            weights = k * aggregator.weighting(jacobian).detach().cpu()  # (k,)
            return weights.to(jacobian.device) @ jacobian

        _replace_shared_gradient(ordered, shared, combine)
        self.last = {t: float(w) for t, w in zip(ordered, weights.tolist(), strict=True)}
        return self.last


# weighting name -> (torchjd aggregator class, default arguments); all are WeightedAggregators
AGGREGATORS: dict[str, tuple[str, dict[str, Any]]] = {
    "upgrad": ("UPGrad", {}),
    "mgda": ("MGDA", {}),
    "imtl_g": ("IMTLG", {}),
    "aligned_mtl": ("AlignedMTL", {}),
    "dualproj": ("DualProj", {}),
    "cagrad": ("CAGrad", {"c": 0.5}),
    "nash_mtl": ("NashMTL", {"n_tasks": 0}),
}

_METHODS: dict[str, type[LossWeighting]] = {
    "static": StaticWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DWA,
    "gradnorm": GradNorm,
    "pcgrad": PCGrad,
}
WEIGHTINGS = (*_METHODS, *AGGREGATORS)


def make_weighting(name: str, tasks: Sequence[str], **kwargs: Any) -> LossWeighting:
    """Build a weighting method by name.

    Args:
        name: one of :data:`WEIGHTINGS`.
        tasks: the task names.
        **kwargs: the method's own arguments (e.g. ``temperature`` for ``dwa``).

    Raises:
        ValueError: an unknown name.
    """
    if name in AGGREGATORS:
        return JacobianAggregation(tasks, name, **kwargs)
    if name not in _METHODS:
        raise ValueError(f"unknown loss weighting {name!r}; expected one of {sorted(WEIGHTINGS)}")
    return _METHODS[name](tasks, **kwargs)


def needs_shared(name: str) -> bool:
    """Whether weighting ``name`` works on per-task gradients of shared parameters (so a run needs some)."""
    return name in AGGREGATORS or (name in _METHODS and not _METHODS[name].weighted_sum)
