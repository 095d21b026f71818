"""The batch source of training: which task each row comes from, which example, collated and on the device.

Every process draws the same global batch (same seeds) and keeps its own slice, so N processes of
``batch_size`` rows see exactly the rows one process of N·``batch_size`` rows would (DDP). All randomness
is seeded and saved by :meth:`BatchSource.state_dict`, so a resumed run draws the same batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .objectives import collate
from .sampler import TaskSampler

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["BATCHING", "Batch", "BatchSource"]

BATCHING = ("per_task", "mixed")


@dataclass
class Batch:
    """One process's rows of a training batch.

    Attributes:
        inputs: the padded model inputs, on the device (``input_ids`` (B, T), ``attention_mask`` (B, T)...).
        labels: one label object per row (its shape depends on the task kind; see :mod:`.objectives`).
        rows: the task of each row.
    """

    inputs: dict[str, torch.Tensor]
    labels: list
    rows: list[str]


class _IndexStream:
    """Endless, seeded, resumable stream of example indices (a new permutation each epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> int:
        if self.pos == self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        self.pos += 1
        return int(self._perm[self.pos - 1])

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: Mapping[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()


class BatchSource:
    """Training batches from several tasks' encoded training sets.

    Args:
        train_sets: ``{task: encoded training set}`` (rows with ``input_ids``, ``attention_mask``, ``labels``).
        tokenizer: pads the rows.
        sampler: picks the task of each batch (``per_task``) or of each row (``mixed``).
        batch_size: rows per process.
        batching: one of :data:`BATCHING`.
        seed: seeds the per-task example order (task ``i`` gets ``seed + i``).
        num_processes / process_index: the data-parallel world and this process's place in it.
        device: where the batches go.
    """

    def __init__(
        self,
        train_sets: Mapping[str, Sequence[dict]],
        tokenizer: PreTrainedTokenizerBase,
        sampler: TaskSampler,
        *,
        batch_size: int,
        batching: str,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.train_sets, self.tokenizer, self.sampler = dict(train_sets), tokenizer, sampler
        self.batch_size, self.batching = batch_size, batching
        self.num_processes, self.process_index, self.device = num_processes, process_index, device
        self.streams = {
            t: _IndexStream(len(ds), seed + i) for i, (t, ds) in enumerate(self.train_sets.items())
        }

    def draw(self, step: int, active: Sequence[str]) -> Batch:
        """This process's slice of the next global batch.

        Args:
            step: the optimiser step (annealed sampling depends on it).
            active: the tasks still training (early stopping); rows of other tasks are not drawn. Empty:
                every task.
        """
        B = self.batch_size * self.num_processes
        active = list(active) or list(self.train_sets)
        if self.batching == "per_task":
            task = self.sampler.sample(step)
            while task not in active:
                task = self.sampler.sample(step)
            rows = [task] * B
        else:
            rows = [t if t in active else active[0] for t in self.sampler.sample_rows(B, step)]
        # the whole global batch advances every stream, so every process's streams stay in step
        indices = [self.streams[t].next() for t in rows]
        lo = self.process_index * self.batch_size
        rows, indices = rows[lo : lo + self.batch_size], indices[lo : lo + self.batch_size]
        inputs, labels = collate(
            self.tokenizer, [self.train_sets[t][i] for t, i in zip(rows, indices, strict=True)]
        )
        return Batch({k: v.to(self.device) for k, v in inputs.items()}, labels, rows)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's and the example streams' positions (JSON-able)."""
        return {
            "sampler": self.sampler.state_dict(),
            "streams": {t: s.state() for t, s in self.streams.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.sampler.load_state_dict(state["sampler"])
        for t, s in state["streams"].items():
            self.streams[t].load(s)
