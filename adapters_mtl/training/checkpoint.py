"""The training checkpoint: a folder with ``state.safetensors`` (tensors) and ``trainer_state.json`` (the rest).

Nothing is pickled, and a resumed run ends with the same adapters as an uninterrupted one. The layout
(keep it readable by later versions: runs are resumed from checkpoints written by earlier ones)::

    state.safetensors
      param::<key>                 every trainable parameter, <key> as in the trainer's ``trainable``
      optim::<key>::<name>         its optimiser state (AdamW: step, exp_avg, exp_avg_sq)
      rng::torch                   torch's CPU RNG state
      best::<task>::<key>          the task's adapters at its best validation score (EarlyStopping.tensors)
      weighting::<name>            the tensors of the loss weighting's state_dict()
    trainer_state.json
      step, history                the last completed step and one row of metrics per step
      sampler, streams             the batch source's state_dict()
      best                         EarlyStopping.best
      weighting                    the JSON values of the loss weighting's state_dict()
      config                       the TrainConfig (a record; not read back)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .batches import BatchSource
from .early_stopping import EarlyStopping
from .weighting import LossWeighting

__all__ = ["Checkpointer"]

STATE_FILE, META_FILE = "state.safetensors", "trainer_state.json"


class Checkpointer:
    """Write and read the checkpoint of one run; it holds the live objects and saves/restores them in place.

    Args:
        params: every parameter the optimiser updates, under a stable key.
        optimizer: the optimiser of ``params`` (its per-parameter state is saved).
        weighting: the loss weighting (its :meth:`~LossWeighting.state_dict`).
        batches: the batch source (its sampler and example streams).
        early_stopping: per-task best scores and snapshots.
        config: the run's settings as plain values, recorded in the JSON.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        optimizer: torch.optim.Optimizer,
        weighting: LossWeighting,
        batches: BatchSource,
        early_stopping: EarlyStopping,
        config: Mapping[str, Any],
    ) -> None:
        self.params, self.optimizer, self.weighting = params, optimizer, weighting
        self.batches, self.early_stopping, self.config = batches, early_stopping, config

    def save(self, path: str | Path, step: int, history: list[dict]) -> Path:
        """Write the checkpoint of the run after ``step`` to the folder ``path`` (replacing any there).

        The folder is written beside the target, then swapped in: a run killed while saving keeps its last
        checkpoint.
        """
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors, meta = self._state(step, history)
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, default=float))
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    @torch.no_grad()
    def load(self, path: str | Path) -> tuple[int, list[dict]]:
        """Restore the run from the checkpoint folder ``path``; returns its ``(step, history)``.

        Raises:
            FileNotFoundError: no checkpoint in ``path``.
            ValueError: the checkpoint lacks a trainable parameter of this run (another set-up wrote it).
        """
        path = Path(path)
        old = path.with_name(f".{path.name}.old")
        if not (path / META_FILE).is_file() and (old / META_FILE).is_file():
            path = old  # killed between the two renames of save(): the previous checkpoint is whole
        if not (path / META_FILE).is_file():
            raise FileNotFoundError(f"no checkpoint in {path} (expected {META_FILE} and {STATE_FILE})")
        meta = json.loads((path / META_FILE).read_text())
        tensors = load_file(str(path / STATE_FILE))
        missing = [k for k in self.params if f"param::{k}" not in tensors]
        if missing:
            raise ValueError(
                f"checkpoint {path} does not match this run (no tensors for {missing[:3]}...): resume with the "
                "same tasks, adapters, sharing and weighting as the run that wrote it"
            )
        state = self.optimizer.state
        for key, p in self.params.items():
            p.copy_(tensors[f"param::{key}"])
            moments = _strip(tensors, f"optim::{key}::")
            if moments:
                state[p] = moments
        self.weighting.load_state_dict({**meta.get("weighting", {}), **_strip(tensors, "weighting::")})
        torch.set_rng_state(tensors["rng::torch"])
        snapshots: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in _strip(tensors, "best::").items():
            task, name = k.split("::", 1)
            snapshots.setdefault(task, {})[name] = v
        self.early_stopping.load_state_dict({"best": meta["best"], "tensors": snapshots})
        self.batches.load_state_dict({"sampler": meta["sampler"], "streams": meta["streams"]})
        return meta["step"], meta["history"]

    def _state(self, step: int, history: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        keys = {id(p): k for k, p in self.params.items()}
        tensors = {f"param::{k}": p.detach().contiguous().clone() for k, p in self.params.items()}
        for p, state in self.optimizer.state.items():
            for k, v in state.items():
                tensors[f"optim::{keys[id(p)]}::{k}"] = (
                    v.detach().contiguous().clone() if torch.is_tensor(v) else torch.tensor(v)
                )
        tensors["rng::torch"] = torch.get_rng_state()
        stopping = self.early_stopping.state_dict()
        for t, snap in stopping["tensors"].items():
            tensors.update({f"best::{t}::{k}": v.contiguous() for k, v in snap.items()})
        weighting = self.weighting.state_dict()
        tensors.update(
            {f"weighting::{k}": v.detach().clone() for k, v in weighting.items() if torch.is_tensor(v)}
        )
        meta = {
            "step": step,
            **self.batches.state_dict(),  # sampler, streams
            "best": stopping["best"],
            "history": history,
            "config": dict(self.config),
            "weighting": {k: v for k, v in weighting.items() if not torch.is_tensor(v)},
        }
        return tensors, meta


def _strip(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose key starts with ``prefix``, under the rest of their key."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
