"""Per-row routing state shared by every adapter bank of one model.

The model turns ``adapters=[name per row]`` into slot indices once per forward; each bank reads them
from this shared object instead of receiving extra forward arguments, so the base model's own
forward (and ``generate``) runs unchanged. Activating an adapter is one assignment here: O(1) and
independent of how many adapters or layers there are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

__all__ = ["MixedRows", "Route", "StaticSlot"]


@dataclass
class MixedRows:
    """Rows of a batch that use different LoRA slots.

    Attributes:
        idx: (B,) global slot per row; 0 is the empty slot (no LoRA).
        uniq: the distinct slots in ``idx`` (Python ints, sorted), known without a device sync.
        inv: (B,) position of each row's slot in ``uniq``.
    """

    idx: torch.Tensor
    uniq: list[int]
    inv: torch.Tensor
    _expanded: dict[int, MixedRows] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.idx.shape[0]

    def for_batch(self, n: int) -> MixedRows:
        """The rows for a batch of ``n`` (``generate`` repeats each row for beams / num_return_sequences)."""
        if n == self.batch_size:
            return self
        if n % self.batch_size:
            raise RuntimeError(
                f"routed batch has {self.batch_size} rows but a layer received {n}: a batch size the "
                "routing cannot map (expected a multiple of the routed rows)."
            )
        if n not in self._expanded:
            k = n // self.batch_size
            self._expanded[n] = MixedRows(
                self.idx.repeat_interleave(k), self.uniq, self.inv.repeat_interleave(k)
            )
        return self._expanded[n]


class StaticSlot:
    """One LoRA slot for every row, held in a 1-element tensor: a compiled model reads it as data, so
    switching adapters (writing the tensor in place) needs no recompilation. Layers then compute at the
    stacks' full rank (the rows past an adapter's rank are zeros), which is what makes shapes static."""

    __slots__ = ("slot",)

    def __init__(self, device: torch.device) -> None:
        self.slot = torch.zeros(1, dtype=torch.long, device=device)


class Route:
    """What every bank needs to know about the current call.

    Attributes:
        lora: an int (one LoRA slot for all rows; 0 = none), a :class:`StaticSlot` (the same, as data for
            compiled models) or :class:`MixedRows`.
        prefix: the prefix context of the current call (set by the prefix bank), or ``None``.
        strategy: how mixed LoRA rows are computed: ``"gather"`` (gather each row's A/B from a
            stacked bank, then two batched matmuls) or ``"group"`` (one matmul per distinct adapter).
    """

    __slots__ = ("lora", "prefix", "strategy")

    def __init__(self) -> None:
        self.lora: int | StaticSlot | MixedRows = 0
        self.prefix: object | None = None
        self.strategy: str = "gather"

    @contextmanager
    def scoped(self, selections: dict[str, object]) -> Iterator[None]:
        """Route one call (``{method name: its selection}``); restore the previous routing afterwards."""
        saved = {k: getattr(self, k) for k in selections}
        for k, v in selections.items():
            setattr(self, k, v)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    def set_default(self, selections: dict[str, object]) -> None:
        """The routing used by plain calls (no ``adapters=``): one assignment per method, O(1)."""
        for k, v in selections.items():
            setattr(self, k, v)
