"""Loss weighting for multi-task training, behind one interface.

Every method implements ``backward(losses, shared) -> weights``: it runs the backward pass for the dict
of per-task losses (scalar tensors) and returns the weights it used. Methods whose result is one
weighted sum (static, uncertainty, dwa) also offer ``total(losses)`` so a trainer can backward it
through Accelerate (loss scaling); they record the weights used in ``last``. ``shared`` are the parameters
shared by all tasks (e.g. a shared adapter); GradNorm and PCGrad work on their gradients only, task
adapters and heads get their ordinary gradients.

  static       Σ w_i L_i with fixed w_i
  uncertainty  Σ ½·exp(-s_i)·L_i + ½·s_i, s_i = log σ_i² learned (Kendall, Gal & Cipolla 2018)
  dwa          w_i = K·softmax_i(r_i / T), r_i = L̄_i(e-1) / L̄_i(e-2) over epochs (Liu, Johns & Davison 2019)
  gradnorm     learned w_i pulling each task's gradient norm on `shared` towards mean·(L̃_i / mean L̃)^α
               (Chen et al. 2018), w renormalised to sum to K
  pcgrad       per-task gradients on `shared`; a gradient conflicting with another (negative dot product)
               loses its component along it (Yu et al. 2020)
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "DWA",
    "WEIGHTINGS",
    "GradNorm",
    "PCGrad",
    "StaticWeighting",
    "UncertaintyWeighting",
    "make_weighting",
]

Losses = Mapping[str, torch.Tensor]


def _check(losses: Losses, tasks: Sequence[str]) -> None:
    unknown = sorted(set(losses) - set(tasks))
    if unknown:
        raise KeyError(f"losses for unknown tasks {unknown}; this weighting was built for {list(tasks)}")


class StaticWeighting:
    """Fixed weights (default 1 for every task)."""

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        self.tasks = list(tasks)
        self.w = {t: float((weights or {}).get(t, 1.0)) for t in self.tasks}

    def total(self, losses: Losses) -> torch.Tensor:
        _check(losses, self.tasks)
        self.last = {t: self.w[t] for t in losses}
        return sum(self.w[t] * loss for t, loss in losses.items())

    def backward(self, losses: Losses, shared: Sequence[nn.Parameter] = ()) -> dict[str, float]:
        self.total(losses).backward()
        return self.last


class UncertaintyWeighting(nn.Module):
    """Homoscedastic-uncertainty weighting with one learned ``log σ²`` per task (add its parameters to
    the optimiser). At the optimum ``s_i = log L_i``: noisier tasks get smaller weights."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def total(self, losses: Losses) -> torch.Tensor:
        _check(losses, self.tasks)
        out = 0.0
        for t, loss in losses.items():
            s = self.log_vars[self.tasks.index(t)]
            out = out + 0.5 * torch.exp(-s) * loss + 0.5 * s
        self.last = self.weights(list(losses))
        return out

    def backward(self, losses: Losses, shared: Sequence[nn.Parameter] = ()) -> dict[str, float]:
        self.total(losses).backward()
        return self.last

    def weights(self, tasks=None) -> dict[str, float]:
        return {t: 0.5 * math.exp(-self.log_vars[self.tasks.index(t)].item()) for t in (tasks or self.tasks)}


class DWA:
    """Dynamic weight average: call :meth:`observe` with each step's losses and :meth:`end_epoch` at the
    end of each epoch (or any fixed window); weights are 1 for the first two epochs."""

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        self.tasks, self.T = list(tasks), float(temperature)
        self.history: list[dict[str, float]] = []  # mean loss per task, per finished epoch
        self._sums = {t: 0.0 for t in self.tasks}
        self._counts = {t: 0 for t in self.tasks}

    def weights(self) -> dict[str, float]:
        if len(self.history) < 2:
            return {t: 1.0 for t in self.tasks}
        prev, prev2 = self.history[-1], self.history[-2]
        r = {t: prev[t] / max(prev2[t], 1e-12) for t in self.tasks}
        z = sum(math.exp(r[t] / self.T) for t in self.tasks)
        return {t: len(self.tasks) * math.exp(r[t] / self.T) / z for t in self.tasks}

    def observe(self, losses: Mapping[str, float | torch.Tensor]) -> None:
        for t, loss in losses.items():
            self._sums[t] += float(loss)
            self._counts[t] += 1

    def end_epoch(self) -> None:
        self.history.append({t: self._sums[t] / max(self._counts[t], 1) for t in self.tasks})
        self._sums = {t: 0.0 for t in self.tasks}
        self._counts = {t: 0 for t in self.tasks}

    def total(self, losses: Losses) -> torch.Tensor:
        _check(losses, self.tasks)
        w = self.weights()
        self.observe({t: loss.detach() for t, loss in losses.items()})
        self.last = {t: w[t] for t in losses}
        return sum(w[t] * loss for t, loss in losses.items())

    def backward(self, losses: Losses, shared: Sequence[nn.Parameter] = ()) -> dict[str, float]:
        self.total(losses).backward()
        return self.last


def _task_grads(losses: Losses, shared: Sequence[nn.Parameter]) -> dict[str, list]:
    return {
        t: torch.autograd.grad(loss, list(shared), retain_graph=True, allow_unused=True)
        for t, loss in losses.items()
    }


class GradNorm(nn.Module):
    """GradNorm with its own small optimiser for the task weights (so it is self-contained).

    Args:
        tasks: task names.
        alpha: restoring-force strength (paper: 0.5–2; 1.5 default).
        lr: learning rate of the weights.
    """

    def __init__(self, tasks: Sequence[str], alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        self.tasks, self.alpha = list(tasks), alpha
        self.w = nn.Parameter(torch.ones(len(self.tasks)))
        self.initial: dict[str, float] = {}
        self._opt = torch.optim.Adam([self.w], lr=lr)

    def backward(self, losses: Losses, shared: Sequence[nn.Parameter] = ()) -> dict[str, float]:
        _check(losses, self.tasks)
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
            [torch.sqrt(sum((g.detach() ** 2).sum() for g in grads[t] if g is not None)) for t in names]
        )
        norms = self.w[idx] * raw.to(self.w.device)
        ratios = torch.tensor([losses[t].item() / self.initial[t] for t in names])
        target = (norms.mean() * (ratios / ratios.mean()) ** self.alpha).detach()
        (grad_w,) = torch.autograd.grad((norms - target).abs().sum(), [self.w], retain_graph=True)
        total = sum(self.w[i].detach() * losses[t] for t, i in zip(names, idx, strict=True))
        total.backward()
        self._opt.zero_grad(set_to_none=True)
        self.w.grad = grad_w
        self._opt.step()
        with torch.no_grad():  # renormalise: weights stay positive and sum to the number of tasks
            self.w.clamp_(min=1e-3)
            self.w.mul_(len(self.tasks) / self.w.sum())
        return {t: self.w[i].item() for t, i in zip(names, idx, strict=True)}


class PCGrad:
    """Projecting conflicting gradients on the shared parameters; other parameters get Σ_i ∇L_i."""

    def __init__(self, tasks: Sequence[str], seed: int = 0, shuffle: bool = True) -> None:
        self.tasks, self.shuffle = list(tasks), shuffle
        self._rng = random.Random(seed)

    @staticmethod
    def project(grads: list[torch.Tensor], order: Sequence[int] | None = None) -> torch.Tensor:
        """Σ_i g_i', where g_i' has the component along each g_j (j ≠ i, in ``order``) removed if g_i'·g_j < 0.

        Args:
            grads: flat per-task gradients (each (P,)).
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
        _check(losses, self.tasks)
        if not shared:
            raise ValueError("PCGrad needs the shared parameters (gradient surgery applies to them only)")
        names = list(losses)
        per_task = _task_grads(losses, shared)
        flat = [
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(per_task[t], shared, strict=True)
                ]
            )
            for t in names
        ]
        order = list(range(len(names)))
        if self.shuffle:
            self._rng.shuffle(order)
        merged = self.project(flat, order)
        before = [p.grad.clone() if p.grad is not None else None for p in shared]  # accumulated so far
        sum(losses.values()).backward()  # task-specific parameters: ordinary gradients
        offset = 0
        for p, prior in zip(shared, before, strict=True):  # shared: the projected sum replaces Σ_i g_i
            n = p.numel()
            p.grad = merged[offset : offset + n].view_as(p).to(p.dtype)
            if prior is not None:  # earlier gradients (accumulation steps, an adversarial loss) are kept
                p.grad += prior
            offset += n
        return {t: 1.0 for t in names}


WEIGHTINGS = ("static", "uncertainty", "dwa", "gradnorm", "pcgrad")


def make_weighting(name: str, tasks: Sequence[str], **kwargs):
    """Build a weighting method by name: one of :data:`WEIGHTINGS`."""
    table = dict(zip(WEIGHTINGS, (StaticWeighting, UncertaintyWeighting, DWA, GradNorm, PCGrad), strict=True))
    if name not in table:
        raise ValueError(f"unknown loss weighting {name!r}; expected one of {sorted(table)}")
    return table[name](tasks, **kwargs)
