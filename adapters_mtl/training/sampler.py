"""Which task each batch (or each row of a mixed batch) comes from.

Strategies (n_i = examples of task i):
  proportional   p_i ∝ n_i
  temperature    p_i ∝ n_i^(1/T)             (T5, MT-DNN; T=1 is proportional, T→∞ uniform)
  round_robin    tasks in a fixed cycle      (deterministic, equal share)
  annealed       p_i ∝ n_i^α(t), α from 1 down to 0.2 over training (Stickland & Murray 2019)
Sampling is seeded and its state is saved with checkpoints, so a resumed run draws the same tasks.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

__all__ = ["STRATEGIES", "TaskSampler"]

STRATEGIES = ("proportional", "temperature", "round_robin", "annealed")


class TaskSampler:
    """Seeded task sampling.

    Args:
        sizes: ``{task: number of training examples}`` (positive).
        strategy: one of :data:`STRATEGIES`.
        temperature: T for ``temperature`` (> 0).
        total_steps: training length, needed by ``annealed``.
        seed: RNG seed.

    Raises:
        ValueError: listing every bad argument at once.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        strategy: str = "proportional",
        *,
        temperature: float = 2.0,
        total_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        problems = []
        if not sizes:
            problems.append("sizes is empty: pass {task: number of examples}")
        problems += [
            f"task {t!r} has size {n!r} (expected a positive int)"
            for t, n in sizes.items()
            if not (isinstance(n, int) and n > 0)
        ]
        if strategy not in STRATEGIES:
            problems.append(f"strategy {strategy!r} is unknown; expected one of {STRATEGIES}")
        if strategy == "temperature" and not temperature > 0:
            problems.append(f"temperature must be > 0, got {temperature!r}")
        if strategy == "annealed" and not (isinstance(total_steps, int) and total_steps > 0):
            problems.append(f"annealed sampling needs total_steps > 0, got {total_steps!r}")
        if problems:
            raise ValueError("invalid TaskSampler: " + "; ".join(problems))
        self.tasks = list(sizes)
        self.sizes = dict(sizes)
        self.strategy, self.temperature, self.total_steps = strategy, float(temperature), total_steps
        self._rng = random.Random(seed)
        self._cursor = 0  # round-robin position

    def alpha(self, step: int) -> float:
        """The exponent on n_i at ``step``."""
        if self.strategy == "proportional":
            return 1.0
        if self.strategy == "temperature":
            return 1.0 / self.temperature
        if self.strategy == "annealed":
            last = (self.total_steps or 1) - 1  # total_steps > 0 is checked for annealed sampling
            frac = min(max(step, 0), last) / max(last, 1)
            return 1.0 - 0.8 * frac
        return 0.0  # round robin: equal shares

    def probabilities(self, step: int = 0) -> dict[str, float]:
        """``{task: probability}`` at ``step``."""
        a = self.alpha(step)
        weights = {t: n**a for t, n in self.sizes.items()}
        total = sum(weights.values())
        return {t: w / total for t, w in weights.items()}

    def sample(self, step: int = 0) -> str:
        """The task of the next batch."""
        if self.strategy == "round_robin":
            task = self.tasks[self._cursor % len(self.tasks)]
            self._cursor += 1
            return task
        probs = self.probabilities(step)
        return self._rng.choices(self.tasks, weights=[probs[t] for t in self.tasks])[0]

    def sample_rows(self, batch_size: int, step: int = 0) -> list[str]:
        """One task per row, for mixed batches routed per row."""
        return [self.sample(step) for _ in range(batch_size)]

    def state_dict(self) -> dict:
        return {"rng": self._rng.getstate(), "cursor": self._cursor}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._cursor = state["cursor"]
