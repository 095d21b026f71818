"""(IA)³'s config (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"), PEFT's ``IA3Config`` both ways."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.config import as_tuple, from_peft_modules

__all__ = ["IA3Config"]


@dataclass(frozen=True)
class IA3Config:
    """(IA)³: learned vectors that rescale activations: ``y = base(x)·l`` on each targeted layer, or
    ``y = base(x·l)`` on the feed-forward ones (PEFT semantics).

    Args:
        targets: module-name suffixes, a regex matched against the full module name (PEFT semantics), or
            ``None`` for PEFT's default targets of the model type (e.g. keys, values and the FFN's output).
        feedforward: the targets whose *input* is scaled (suffixes or a regex, PEFT semantics); ``None``:
            PEFT's default for the model type. Must be among the targets.
        init: ``"ones"`` (identity, as PEFT) or ``"random"`` (1 + N(0, 0.1²): a non-identity start for
            tests).
    """

    targets: tuple[str, ...] | str | None = None
    feedforward: tuple[str, ...] | str | None = None
    init: str = "ones"
    method: str = field(default="ia3", init=False)

    def __post_init__(self) -> None:
        if self.init not in ("ones", "random"):
            raise ValueError(f"invalid IA3Config: init must be 'ones' or 'random', got {self.init!r}")
        object.__setattr__(self, "targets", as_tuple(self.targets))
        object.__setattr__(self, "feedforward", as_tuple(self.feedforward))

    def to_peft(
        self,
        target_modules: list[str] | str | None = None,
        feedforward_modules: list[str] | str | None = None,
        **extra: Any,
    ) -> Any:
        """The equivalent ``peft.IA3Config`` (targets resolved if given)."""
        import peft

        def listed(value: Any) -> Any:
            return list(value) if isinstance(value, tuple) else value

        return peft.IA3Config(
            target_modules=listed(target_modules if target_modules is not None else self.targets),
            feedforward_modules=listed(
                feedforward_modules if feedforward_modules is not None else self.feedforward
            ),
            init_ia3_weights=self.init == "ones",
            **extra,
        )

    @classmethod
    def from_peft(cls, cfg: Any) -> IA3Config:
        """Build from a ``peft.IA3Config``; refuses options this library does not implement."""
        if getattr(cfg, "modules_to_save", None):
            raise ValueError(
                f"this peft.IA3Config has modules_to_save={cfg.modules_to_save!r}; train a head instead "
                "(add_adapter(..., head=HeadConfig(...)))"
            )
        if getattr(cfg, "layers_to_transform", None) is not None:
            raise ValueError(
                "this peft.IA3Config uses layers_to_transform, which adapters_mtl does not support"
            )

        return cls(
            targets=from_peft_modules(cfg.target_modules),
            feedforward=from_peft_modules(cfg.feedforward_modules),
            init="ones" if cfg.init_ia3_weights else "random",
        )
