"""Bottleneck adapters' config (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP";
Pfeiffer et al. 2021, "AdapterFusion"). PEFT has no bottleneck method, so there is no PEFT config: the
config is saved as JSON in adapters_mtl's own format (see ``Method.has_peft_format``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..core.config import as_tuple, positive_number

__all__ = ["NON_LINEARITIES", "PLACEMENTS", "BottleneckConfig"]

PLACEMENTS = ("houlsby", "pfeiffer")
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")


@dataclass(frozen=True)
class BottleneckConfig:
    """A bottleneck adapter after a sub-layer's output projection:
    ``h' = h + scaling · up(act(down(LN(h))))`` (``LN`` only with ``layer_norm``).

    Args:
        placement: ``"houlsby"`` (after the attention output and the feed-forward output of every layer)
            or ``"pfeiffer"`` (after the feed-forward output only). The output projections are known for
            BERT-like, DistilBERT, Llama-like and GPT-2-like models; for others pass ``targets``.
        reduction_factor: the bottleneck width is ``hidden // reduction_factor`` (at least 1).
        size: the bottleneck width itself (overrides ``reduction_factor``).
        non_linearity: ``"relu"``, ``"gelu"``, ``"silu"`` (swish) or ``"tanh"``.
        layer_norm: a learned layer norm on the adapter's input (AdapterHub's ``ln_before``).
        scaling: the factor on the adapter's output (1.0 in the papers).
        init: ``"near_identity"`` (down-projection ~ N(0, 0.01²), up-projection zero: the adapter starts
            as the identity, as Houlsby et al.) or ``"random"`` (both random: a non-identity start for
            tests).
        targets: the output projections to adapt, as module-name suffixes or a regex matched against the
            full module name (PEFT's matching); overrides ``placement``.
    """

    placement: str = "pfeiffer"
    reduction_factor: float = 16.0
    size: int | None = None
    non_linearity: str = "relu"
    layer_norm: bool = False
    scaling: float = 1.0
    init: str = "near_identity"
    targets: tuple[str, ...] | str | None = None
    method: str = field(default="bottleneck", init=False)

    def __post_init__(self) -> None:
        problems = []
        if self.placement not in PLACEMENTS:
            problems.append(f"placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        if not positive_number(self.reduction_factor):
            problems.append(f"reduction_factor must be a positive number, got {self.reduction_factor!r}")
        if self.size is not None and (
            not isinstance(self.size, int) or isinstance(self.size, bool) or self.size <= 0
        ):
            problems.append(f"size must be a positive int or None, got {self.size!r}")
        if self.non_linearity not in NON_LINEARITIES:
            problems.append(
                f"non_linearity must be one of {list(NON_LINEARITIES)}, got {self.non_linearity!r}"
            )
        if not isinstance(self.layer_norm, bool):
            problems.append(f"layer_norm must be true or false, got {self.layer_norm!r}")
        if (
            not isinstance(self.scaling, (int, float))
            or isinstance(self.scaling, bool)
            or not math.isfinite(self.scaling)
        ):
            problems.append(f"scaling must be a finite number, got {self.scaling!r}")
        if self.init not in ("near_identity", "random"):
            problems.append(f"init must be 'near_identity' or 'random', got {self.init!r}")
        if problems:
            raise ValueError("invalid BottleneckConfig: " + "; ".join(problems))
        object.__setattr__(self, "targets", as_tuple(self.targets))

    def width(self, hidden: int) -> int:
        """The bottleneck width on a layer of ``hidden`` features."""
        return self.size if self.size is not None else max(1, int(hidden // self.reduction_factor))

    def to_peft(self, **extra: object) -> None:
        """PEFT has no bottleneck adapters."""
        raise NotImplementedError(
            "PEFT has no bottleneck adapters: they are saved in adapters_mtl's format (config JSON + safetensors)"
        )

    @classmethod
    def from_peft(cls, cfg: object) -> BottleneckConfig:
        """PEFT has no bottleneck adapters (no config to read)."""
        raise NotImplementedError(f"PEFT has no bottleneck adapters; cannot read {type(cfg).__name__}")
