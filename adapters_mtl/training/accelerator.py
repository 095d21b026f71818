"""The Accelerator a training run uses, the one piece of Accelerate's process-wide state we reset, and
FSDP2 sharding of the frozen base (:func:`shard_frozen_base`).

FSDP here shards only what is frozen. The trainable parameters (adapters, heads, the discriminator,
``unfreeze``'d base weights) stay whole on every process and Accelerate's DDP averages their gradients,
as without FSDP. Why not Accelerate's own FSDP2 path (``prepare`` with ``distributed_type: FSDP``):

* it shards every parameter, adapters included, and LoRA's per-adapter parameters are views into the
  stacked per-slot storage (``LoraLayer.stack_A`` / ``stack_B``) that inference gathers rows from: FSDP2
  replaces them with new (DTensor) parameters, the views break, and evaluation would read stale stacks;
* with the adapters left out (``ignored_modules``) nothing synchronises their gradients: each process
  would train its own adapters;
* Accelerate (checked up to 1.15) turns FSDP on for accelerators only: a multi-process CPU run stays DDP.

So :func:`make_accelerator` keeps Accelerate on DDP even under an ``accelerate launch`` FSDP config, and
the trainer calls :func:`shard_frozen_base` before ``prepare`` when :func:`fsdp_requested`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..files.fingerprint import pin_base_fingerprint
from ..model import AdapterModel

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["fsdp_requested", "make_accelerator", "shard_frozen_base"]


def make_accelerator(
    *, mixed_precision: str, grad_accum: int, log_with: Sequence[str], project_dir: str
) -> Accelerator:
    """An Accelerator for one training run (CPU when there is no CUDA device), always on DDP for the
    trainable parameters: under an FSDP config (``accelerate launch --config_file
    configs/accelerate_fsdp.yaml``) the frozen base is sharded by :func:`shard_frozen_base` instead.

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
    with _without_accelerate_fsdp():
        return Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=grad_accum,
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            log_with=list(log_with) or None,
            project_dir=project_dir,
        )


def fsdp_requested(flag: bool = False) -> bool:
    """Whether to shard the frozen base: ``flag`` (``TrainConfig.fsdp``) or an ``accelerate launch`` FSDP
    config (``distributed_type: FSDP`` sets ``ACCELERATE_USE_FSDP=true``)."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


@contextlib.contextmanager
def _without_accelerate_fsdp() -> Iterator[None]:
    """Hide an FSDP launch config from Accelerate while it builds its state and plugins, so that it
    prepares the run for DDP (see the module docstring); the variables are back afterwards."""
    saved = os.environ.get("ACCELERATE_USE_FSDP")
    if saved is None:
        yield
        return
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        os.environ["ACCELERATE_USE_FSDP"] = saved


def shard_frozen_base(
    step_module: nn.Module,
    model: nn.Module,
    device: torch.device,
    layer_classes: Sequence[str] | None = None,
    reshard_after_forward: bool | None = None,
) -> list[str]:
    """Shard the frozen parameters of ``model`` over all processes with FSDP2 (``fully_shard``): one
    unit per transformer layer, the rest of the frozen base (embeddings, final norm, LM head) in the root
    unit ``model``. Trainable parameters are left whole (``ignored_params``): DDP, which Accelerate
    wraps ``step_module`` in afterwards, keeps averaging their gradients and ignores the sharded ones.
    Call it on every process, after the adapters exist and before ``Accelerator.prepare``.

    FSDP2 runs on its own process group, so that its all-gathers never interleave with DDP's
    all-reduces on one group (their order differs between processes whose batches route to other
    adapters).

    Args:
        step_module: what Accelerate prepares (contains ``model``).
        model: the :class:`~adapters_mtl.AdapterModel` (its ``base`` is a transformers model).
        device: the process's device (``Accelerator.device``).
        layer_classes: class names of the layers to shard one by one; default ``FSDP_TRANSFORMER_CLS_TO_WRAP``
            (comma-separated, from the launch config), else the base's ``_no_split_modules``.
        reshard_after_forward: free each layer's gathered weights after its forward (gathered again
            for backward); default ``FSDP_RESHARD_AFTER_FORWARD`` from the launch config, else True.

    Returns:
        The names (in ``step_module``) of the sharded parameters (none in a single process).

    Raises:
        ValueError: no layer of ``layer_classes`` in the base.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return []  # one process: nothing to shard over
    base = model.base if isinstance(model.base, nn.Module) else model
    if layer_classes is None:
        env = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
        layer_classes = env.split(",") if env else list(getattr(base, "_no_split_modules", None) or [])
    names = {c.strip() for c in layer_classes if c.strip()}
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"FSDP: no layer of the classes {sorted(names)} in {type(base).__name__}; name the base's "
            "transformer layer class (fsdp_transformer_layer_cls_to_wrap, e.g. LlamaDecoderLayer)"
        )
    if reshard_after_forward is None:
        reshard_after_forward = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in (
            "true",
            "1",
            "full_shard",
        )
    if isinstance(model, AdapterModel):  # saving adapters later must not read the sharded base
        pin_base_fingerprint(model)
    group = dist.new_group(ranks=list(range(dist.get_world_size())))
    mesh = DeviceMesh.from_group(group, device.type)
    trainable = {p for p in step_module.parameters() if p.requires_grad}
    for layer in layers:  # outermost first would nest units; transformer layers do not nest
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=trainable)
    # the root too reshards after forward: otherwise its frozen leftovers (embeddings, LM head) stay
    # gathered on every process after an evaluation's forward
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=trainable)
    sharded = [n for n, p in step_module.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step_module, sharded)  # noqa: SLF001
    return sharded


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
