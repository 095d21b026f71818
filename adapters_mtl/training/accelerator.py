"""The Accelerator a training run uses, and the one piece of Accelerate's process-wide state we reset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["make_accelerator"]


def make_accelerator(
    *, mixed_precision: str, grad_accum: int, log_with: Sequence[str], project_dir: str
) -> Accelerator:
    """An Accelerator for one training run (CPU when there is no CUDA device).

    Args:
        mixed_precision: ``no`` | ``bf16`` | ``fp16``; in a single process a run may ask for another
            precision than an earlier run of the same process did.
        grad_accum: batches per optimiser step.
        log_with: tracker names (e.g. ``["tensorboard"]``), logging under ``project_dir``.
        project_dir: the run's output folder.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    _allow_new_precision(mixed_precision)
    # adapters of tasks absent from a batch get no gradient: DDP must allow unused parameters
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=list(log_with) or None,
        project_dir=project_dir,
    )


def _allow_new_precision(mixed_precision: str) -> None:
    """Accelerate keeps one process-wide state, fixed by the first Accelerator: a second trainer asking
    for another precision in the same single process (a notebook, a script running several recipes)
    would be refused. There, drop that state (not the process group's PartialState) so the new one
    applies; distributed runs keep Accelerate's refusal, since every rank must agree."""
    from accelerate.state import AcceleratorState, PartialState, is_initialized

    if (
        is_initialized()
        and AcceleratorState().mixed_precision != mixed_precision
        and PartialState().num_processes == 1
    ):
        _reset_accelerator_state()


def _reset_accelerator_state() -> None:
    """Forget the process-wide AcceleratorState (the PartialState, with the process group, stays).

    Accelerate (checked up to 1.15) has no public way to do this: ``Accelerator.free_memory`` releases
    models and optimisers but keeps the state, and its own tests reset it through this same private
    static method (``AccelerateTestCase.tearDown``), so it is the supported-in-practice call.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # noqa: SLF001 - no public API exists (see the docstring)
