"""Prefix tuning's config (Li & Liang 2021), PEFT's ``PrefixTuningConfig`` both ways."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PrefixConfig"]


@dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning: ``num_virtual_tokens`` learned key/value vectors prepended in every attention layer.

    Args:
        num_virtual_tokens: prefix length P.
        projection: reparametrise through a 2-layer MLP (Li & Liang 2021) while training.
        encoder_hidden_size: hidden size of that MLP (default: the model's KV width).
        init_std: std of the initial prefix values (``0`` gives a zero prefix).

    As in PEFT, positions of the real tokens start at ``P`` (the prefix occupies positions 0..P-1), so
    adapters trained with PEFT behave identically here.
    """

    num_virtual_tokens: int = 16
    projection: bool = False
    encoder_hidden_size: int | None = None
    init_std: float = 1.0
    method: str = field(default="prefix", init=False)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            problems.append(f"num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            problems.append(f"init_std must be a number >= 0, got {self.init_std!r}")
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0
        ):
            problems.append(
                f"encoder_hidden_size must be a positive int or None, got {self.encoder_hidden_size!r}"
            )
        if problems:
            raise ValueError("invalid PrefixConfig: " + "; ".join(problems))

    def to_peft(self, **extra: Any) -> Any:
        """The equivalent ``peft.PrefixTuningConfig``."""
        import peft

        kw: dict[str, Any] = dict(
            num_virtual_tokens=self.num_virtual_tokens, prefix_projection=self.projection
        )
        if self.encoder_hidden_size is not None:
            kw["encoder_hidden_size"] = self.encoder_hidden_size
        return peft.PrefixTuningConfig(**kw, **extra)

    @classmethod
    def from_peft(cls, cfg: Any) -> PrefixConfig:
        """Build from a ``peft.PrefixTuningConfig``."""
        return cls(
            num_virtual_tokens=cfg.num_virtual_tokens,
            projection=bool(cfg.prefix_projection),
            encoder_hidden_size=cfg.encoder_hidden_size if cfg.prefix_projection else None,
        )
