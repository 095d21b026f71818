"""LoRA's config (Hu et al. 2021; DoRA, Liu et al. 2024, with ``use_dora``), PEFT's ``LoraConfig`` both ways."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from ..core.config import as_tuple, from_peft_modules, positive_number

__all__ = ["LoraConfig"]


@dataclass(frozen=True)
class LoraConfig:
    """LoRA: ``y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` on each targeted Linear/Conv1D, with ``s = alpha/r`` (or ``alpha/√r``).

    Args:
        r: rank.
        alpha: scaling numerator.
        targets: module-name suffixes (e.g. ``("q_proj", "v_proj")``), a regex matched against the full
            module name (PEFT semantics), or ``None`` for PEFT's default targets of the model type.
        dropout: dropout on the LoRA input, training only.
        use_rslora: rank-stabilised scaling ``alpha/√r``.
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``alpha`` (PEFT semantics: keys are
            matched against module names).
        init: ``"default"`` (A Kaiming-uniform, B zero: the adapter starts as identity, as in PEFT),
            ``"gaussian"`` (A normal(1/r), B zero) or ``"random"`` (A and B random: a non-identity start,
            used by tests so that merges are really exercised) or ``"zeros"`` (both zero: for weights
            that are loaded right after).
        layers_to_transform: only these layer indices (PEFT semantics).
        exclude: module names (suffixes) or a regex never to target (PEFT's ``exclude_modules``).
        use_dora: DoRA (weight-decomposed LoRA, PEFT's ``use_dora``): each output channel of the adapted
            weight is rescaled to a trained magnitude, ``W' = m/‖W + s·B·A‖·(W + s·B·A)`` (the norm per
            output channel, treated as a constant in backward as in the paper), with ``m`` starting at
            ``‖W + s·B·A‖`` (so the adapter starts as plain LoRA). A DoRA adapter cannot be combined
            with other adapters into one LoRA (``merge_adapters``, stack folding); a stack may hold at
            most one DoRA adapter.

    ``targets="all-linear"`` targets every Linear/Conv1D but the output layer, as in PEFT.
    """

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | str | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    init: str = "default"
    layers_to_transform: tuple[int, ...] | None = None
    exclude: tuple[str, ...] | str | None = None
    use_dora: bool = False
    method: str = field(default="lora", init=False)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            problems.append(f"r must be a positive int, got {self.r!r}")
        if not positive_number(self.alpha):
            problems.append(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("default", "gaussian", "random", "zeros"):
            problems.append(f"init must be 'default', 'gaussian', 'random' or 'zeros', got {self.init!r}")
        if not isinstance(self.use_dora, bool):
            problems.append(f"use_dora must be True or False, got {self.use_dora!r}")
        for key, rank in dict(self.rank_pattern).items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                problems.append(f"rank_pattern[{key!r}] must be a positive int, got {rank!r}")
        for key, alpha in dict(self.alpha_pattern).items():
            if not positive_number(alpha):
                problems.append(f"alpha_pattern[{key!r}] must be a positive finite number, got {alpha!r}")
        if problems:
            raise ValueError("invalid LoraConfig: " + "; ".join(problems))
        object.__setattr__(self, "targets", as_tuple(self.targets))
        object.__setattr__(self, "layers_to_transform", as_tuple(self.layers_to_transform))
        object.__setattr__(self, "exclude", as_tuple(self.exclude))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))

    def scaling(self, r: int, alpha: float) -> float:
        """The LoRA scale for a module of rank ``r`` and ``alpha``."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_peft(self, target_modules: list[str] | tuple[str, ...] | str | None = None, **extra: Any) -> Any:
        """The equivalent ``peft.LoraConfig`` (``target_modules`` resolved if given)."""
        import peft

        targets = target_modules if target_modules is not None else self.targets
        return peft.LoraConfig(
            r=self.r,
            # peft annotates lora_alpha as int, but scales by any number (alpha / r): a float alpha is valid
            lora_alpha=self.alpha,  # type: ignore[arg-type]
            target_modules=list(targets) if isinstance(targets, tuple) else targets,
            lora_dropout=self.dropout,
            use_rslora=self.use_rslora,
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            layers_to_transform=list(self.layers_to_transform) if self.layers_to_transform else None,
            exclude_modules=list(self.exclude) if isinstance(self.exclude, tuple) else self.exclude,
            use_dora=self.use_dora,
            **extra,
        )

    @classmethod
    def from_peft(cls, cfg: Any) -> LoraConfig:
        """Build from a ``peft.LoraConfig``; refuses options this library does not implement."""
        unsupported = []
        if getattr(cfg, "bias", "none") != "none":
            unsupported.append(f"bias={cfg.bias!r}")
        if getattr(cfg, "modules_to_save", None):
            # a saved SEQ_CLS/TOKEN_CLS folder's classifier is read by adapters_mtl.files.folder (it becomes the head)
            unsupported.append(
                f"modules_to_save={cfg.modules_to_save!r} (train a head instead: add_adapter(..., "
                "head=HeadConfig(...)); a saved PEFT classifier folder loads with adapters_mtl.files.folder.load_adapter)"
            )
        if getattr(cfg, "target_parameters", None):
            unsupported.append("target_parameters")
        init = cfg.init_lora_weights
        if init not in (True, False, "gaussian"):
            unsupported.append(f"init_lora_weights={init!r} (only True, False or 'gaussian')")
        for flag in (
            "lora_bias",
            "use_qalora",
            "layer_replication",
            "trainable_token_indices",
            "alora_invocation_tokens",
        ):
            if getattr(cfg, flag, None):
                unsupported.append(f"{flag}={getattr(cfg, flag)!r}")
        if unsupported:
            raise ValueError(
                "this peft.LoraConfig uses options adapters_mtl does not support: "
                + ", ".join(unsupported)
                + ". Remove them, or use PEFT for this adapter."
            )
        return cls(
            r=cfg.r,
            alpha=cfg.lora_alpha,
            targets=from_peft_modules(cfg.target_modules),
            dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            rank_pattern=dict(cfg.rank_pattern or {}),
            alpha_pattern=dict(cfg.alpha_pattern or {}),
            init="random" if init is False else ("gaussian" if init == "gaussian" else "default"),
            layers_to_transform=(
                (cfg.layers_to_transform,)
                if isinstance(cfg.layers_to_transform, int)
                # peft's is a list of ints or None here, never a str
                else cast("tuple[int, ...] | None", as_tuple(cfg.layers_to_transform))
            ),
            exclude=from_peft_modules(cfg.exclude_modules),
            use_dora=getattr(cfg, "use_dora", False),
        )
