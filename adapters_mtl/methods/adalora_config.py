"""AdaLoRA's config (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"),
PEFT's ``AdaLoraConfig`` both ways."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.config import as_tuple, from_peft_modules, positive_number

__all__ = ["AdaLoraConfig"]


def _count(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@dataclass(frozen=True)
class AdaLoraConfig:
    """AdaLoRA: ``y = x·Wᵀ + (x·(A⊙E)ᵀ·Bᵀ)·alpha/(init_r + 1e-5)`` on each targeted Linear/Conv1D (PEFT's SVD
    form: A (r, in) right and B (out, r) left singular vectors, E (r, 1) singular values), trained with an
    orthogonality regulariser on A and B and a rank budget that shrinks from ``init_r`` to ``target_r`` per
    module on average, by masking the least important triplets (E entries set to zero).

    The budget follows PEFT's schedule, counted in optimiser steps from 1: the first ``tinit`` steps keep
    every triplet, then the budget falls cubically (a masking every ``delta_t`` steps) until step
    ``total_step - tfinal``, where the final budget ``target_r × modules`` is set; the last ``tfinal`` steps
    fine-tune what is kept.

    Args:
        init_r: rank every module starts with.
        target_r: the average rank per module the budget ends at (at most ``init_r``).
        alpha: scaling numerator (PEFT's ``lora_alpha``).
        targets: module-name suffixes, a regex matched against the full module name (PEFT semantics), or
            ``None`` for PEFT's default AdaLoRA targets of the model type.
        dropout: dropout on the adapter's input, training only.
        tinit / tfinal: warm-up steps without masking / final steps without re-allocation.
        delta_t: steps between two allocations (PEFT's ``deltaT``).
        beta1 / beta2: EMA factors of the importance (sensitivity) and of its uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser ``mean ‖AAᵀ−I‖_F, ‖BᵀB−I‖_F``.
        total_step: the schedule's length in optimiser steps; ``None``: the training run's step count.
        rank_pattern: which triplets a saved adapter kept, ``{module path: (bool, ...) of length init_r}``
            (PEFT's ``rank_pattern``, read when an adapter folder is loaded).
        init: ``"default"`` (E zero, A and B normal(0, 0.02): the adapter starts as identity, as PEFT),
            ``"random"`` (A, E, B standard normal: a non-identity start, as PEFT's ``init_lora_weights=False``)
            or ``"zeros"`` (for weights that are loaded right after).
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] | str | None = None
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: Mapping[str, tuple[bool, ...]] = field(default_factory=dict)
    init: str = "default"
    method: str = field(default="adalora", init=False)

    def __post_init__(self) -> None:
        problems = []
        if not _count(self.init_r, 1):
            problems.append(f"init_r must be a positive int, got {self.init_r!r}")
        if not _count(self.target_r, 1) or (_count(self.init_r, 1) and self.target_r > self.init_r):
            problems.append(f"target_r must be an int in [1, init_r={self.init_r!r}], got {self.target_r!r}")
        if not positive_number(self.alpha):
            problems.append(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        for key in ("tinit", "tfinal"):
            if not _count(getattr(self, key), 0):
                problems.append(f"{key} must be an int >= 0, got {getattr(self, key)!r}")
        if not _count(self.delta_t, 1):
            problems.append(f"delta_t must be a positive int, got {self.delta_t!r}")
        for key in ("beta1", "beta2"):
            beta = getattr(self, key)
            if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 < beta < 1.0:
                problems.append(f"{key} must be in (0, 1), got {beta!r}")
        w = self.orth_reg_weight
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            problems.append(f"orth_reg_weight must be a finite number >= 0, got {w!r}")
        if self.total_step is not None:
            if not _count(self.total_step, 1):
                problems.append(f"total_step must be a positive int or None, got {self.total_step!r}")
            elif _count(self.tinit, 0) and _count(self.tfinal, 0):
                problems.extend(schedule_problem(self.tinit, self.tfinal, self.total_step))
        if self.init not in ("default", "random", "zeros"):
            problems.append(f"init must be 'default', 'random' or 'zeros', got {self.init!r}")
        pattern = {}
        for key, mask in dict(self.rank_pattern).items():
            kept = tuple(mask) if isinstance(mask, (list, tuple)) else ()
            if not all(isinstance(b, bool) for b in kept) or len(kept) != self.init_r:
                problems.append(
                    f"rank_pattern[{key!r}] must be {self.init_r} booleans (init_r), got {mask!r}"
                )
            pattern[key] = kept
        if problems:
            raise ValueError("invalid AdaLoraConfig: " + "; ".join(problems))
        object.__setattr__(self, "targets", as_tuple(self.targets))
        object.__setattr__(self, "rank_pattern", pattern)

    @property
    def scaling(self) -> float:
        """The numerator of the update's scale (``alpha``; the denominator is the rank count + 1e-5)."""
        return float(self.alpha)

    def to_peft(
        self,
        target_modules: list[str] | tuple[str, ...] | str | None = None,
        total_step: int | None = None,
        **extra: Any,
    ) -> Any:
        """The equivalent ``peft.AdaLoraConfig``. ``total_step`` replaces the config's; PEFT requires one, so
        without either the shortest schedule PEFT accepts is written (``tinit + tfinal + 1``: a saved
        adapter's schedule is history, what it computes does not depend on it)."""
        import peft

        targets = target_modules if target_modules is not None else self.targets
        steps = total_step or self.total_step or self.tinit + self.tfinal + 1
        pattern = {f"{k}.lora_E": list(v) for k, v in self.rank_pattern.items()} or None
        return peft.AdaLoraConfig(
            init_r=self.init_r,
            target_r=self.target_r,
            # peft annotates lora_alpha as int, but scales by any number: a float alpha is valid
            lora_alpha=self.alpha,  # type: ignore[arg-type]
            target_modules=list(targets) if isinstance(targets, tuple) else targets,
            lora_dropout=self.dropout,
            tinit=self.tinit,
            tfinal=self.tfinal,
            deltaT=self.delta_t,
            beta1=self.beta1,
            beta2=self.beta2,
            orth_reg_weight=self.orth_reg_weight,
            total_step=steps,
            rank_pattern=pattern,
            init_lora_weights=self.init != "random",
            **extra,
        )

    @classmethod
    def from_peft(cls, cfg: Any) -> AdaLoraConfig:
        """Build from a ``peft.AdaLoraConfig``; refuses options this library does not implement."""
        unsupported = []
        if getattr(cfg, "bias", "none") != "none":
            unsupported.append(f"bias={cfg.bias!r}")
        if getattr(cfg, "modules_to_save", None):
            unsupported.append(
                f"modules_to_save={cfg.modules_to_save!r} (train a head instead: add_adapter(..., head=...))"
            )
        if cfg.init_lora_weights not in (True, False):
            unsupported.append(f"init_lora_weights={cfg.init_lora_weights!r} (only True or False)")
        for flag in (
            "layers_to_transform",
            "layers_pattern",
            "exclude_modules",
            "target_parameters",
            "trainable_token_indices",
            "layer_replication",
            "lora_bias",
        ):
            if getattr(cfg, flag, None):
                unsupported.append(f"{flag}={getattr(cfg, flag)!r}")
        if unsupported:
            raise ValueError(
                "this peft.AdaLoraConfig uses options adapters_mtl does not support: "
                + ", ".join(unsupported)
                + ". Remove them, or use PEFT for this adapter."
            )
        # PEFT keys its masks "<module path>.lora_E" (".lora_E.<adapter>" while training)
        pattern = {k.rsplit(".lora_E", 1)[0]: tuple(v) for k, v in (cfg.rank_pattern or {}).items()}
        return cls(
            init_r=cfg.init_r,
            target_r=cfg.target_r,
            # PEFT scales by lora_alpha, or by the rank when lora_alpha <= 0
            alpha=cfg.lora_alpha if cfg.lora_alpha > 0 else float(cfg.init_r),
            targets=from_peft_modules(cfg.target_modules),
            dropout=cfg.lora_dropout,
            tinit=cfg.tinit,
            tfinal=cfg.tfinal,
            delta_t=cfg.deltaT,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            orth_reg_weight=cfg.orth_reg_weight,
            total_step=cfg.total_step,
            rank_pattern=pattern,
            init="default" if cfg.init_lora_weights else "random",
        )


def schedule_problem(tinit: int, tfinal: int, total_step: int) -> list[str]:
    """What is wrong with a budget schedule (PEFT's rule: a budgeting phase must remain)."""
    if tinit < total_step - tfinal:
        return []
    return [
        f"the schedule leaves no budgeting phase: tinit={tinit} must be < total_step - tfinal = "
        f"{total_step} - {tfinal}; decrease tinit/tfinal or train for more steps"
    ]
