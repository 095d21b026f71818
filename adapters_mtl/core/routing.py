"""Per-row routing state read by every adapter bank of one model.

The model turns ``adapters=[name per row]`` into slot indices once per call; each bank reads them
through :meth:`Route.get` instead of receiving extra forward arguments, so the base model's own forward
(and ``generate``) runs unchanged. Two layers of state:

* the process-wide default (:meth:`Route.set_default`, what ``activate`` sets): shared by every caller,
  replaced in one assignment, so activating an adapter stays O(1) whatever the number of adapters/layers;
* the routing of the call in progress (:meth:`Route.scoped`: ``forward(adapters=...)``, ``generate``,
  ``using``): thread-local, so concurrent calls on one model in different threads each see only their own.

Thread-local rather than a ``contextvars.ContextVar``: ``torch.compile`` (2.13) traces a
``threading.local`` attribute read as guarded data but graph-breaks on ``ContextVar.get``, and this read
sits inside every adapted layer of a compiled model. A call runs synchronously in one thread, so
per-thread is per-call; asyncio tasks that share a thread must not hold a ``using()`` block across an
``await`` (pass ``adapters=`` instead).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "ROUTING_STRATEGIES",
    "MixedRows",
    "Route",
    "Segments",
    "SlotSelection",
    "StaticSlot",
    "one_per_row",
    "repeats",
    "slot_selection",
]


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
    _segments: Segments | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.idx.shape[0]

    def for_batch(self, n: int) -> MixedRows:
        """The rows for a batch of ``n`` (``generate`` repeats each row for beams / num_return_sequences)."""
        if n == self.batch_size:
            return self
        if n not in self._expanded:
            k = repeats(self.batch_size, n)
            self._expanded[n] = MixedRows(
                self.idx.repeat_interleave(k), self.uniq, self.inv.repeat_interleave(k)
            )
        return self._expanded[n]

    def segments(self) -> Segments:
        """The rows sorted by slot (for grouped matmuls), computed once per call and shared by all layers."""
        if self._segments is None:
            self._segments = Segments.of(self)
        return self._segments


@dataclass
class Segments:
    """The rows of a :class:`MixedRows` grouped by slot, all on the rows' device (no host sync).

    Attributes:
        order: (B,) row indices sorted by slot (stable); ``inverse`` puts sorted rows back.
        slots: (G,) the distinct slots (``MixedRows.uniq``) as a tensor.
        rows_per_slot: (G,) how many rows use each of them.
    """

    order: torch.Tensor
    inverse: torch.Tensor
    slots: torch.Tensor
    rows_per_slot: torch.Tensor

    @staticmethod
    def of(rows: MixedRows) -> Segments:
        order = torch.argsort(rows.inv, stable=True)
        return Segments(
            order=order,
            inverse=torch.argsort(order),
            slots=torch.tensor(rows.uniq, device=rows.idx.device),
            rows_per_slot=torch.bincount(rows.inv, minlength=len(rows.uniq)),
        )

    def offsets(self, tokens: int) -> torch.Tensor:
        """int32 end offset of each slot's segment of the sorted (rows·tokens) matrix (grouped-mm ``offs``)."""
        return torch.cumsum(self.rows_per_slot * tokens, 0).to(torch.int32)

    def per_token(self, values: torch.Tensor, tokens: int) -> torch.Tensor:
        """A per-slot ``values`` (G,) repeated for every token of the sorted rows: (rows·tokens,)."""
        n = int(self.order.shape[0]) * tokens
        return values.repeat_interleave(self.rows_per_slot * tokens, output_size=n)


SlotSelection = int | MixedRows | tuple[int | MixedRows, ...]
ROUTING_STRATEGIES = ("gather", "group", "segment")  # AdapterModel.routing_strategy


def slot_selection(
    entries: Sequence[str | tuple[str, ...] | None],
    slot: Mapping[str, int],
    device: Callable[[], torch.device],
) -> SlotSelection:
    """The routing of a method that gives each adapter a global slot (0 = none): one entry per row (a name,
    None, or a tuple = a stack) becomes an int (every row the same slot), :class:`MixedRows`, or for stacks
    a tuple with one level per position (level k holds each row's k-th adapter of this method). Names the
    method does not hold are skipped. ``device`` is called only when rows differ."""
    stacks = [
        tuple(n for n in (e if isinstance(e, tuple) else (e,)) if n is not None and n in slot)
        for e in entries
    ]
    depth = max((len(s) for s in stacks), default=0)
    if depth <= 1:
        return _slot_level([slot[s[0]] if s else 0 for s in stacks], device)
    return tuple(_slot_level([slot[s[k]] if k < len(s) else 0 for s in stacks], device) for k in range(depth))


def one_per_row(
    entries: Sequence[str | tuple[str, ...] | None], held: Container[str], what: str, hint: str = ""
) -> list[str | None]:
    """Each row's one adapter among ``held`` (None where it has none), for methods a row can use at most
    once (a prefix, a prompt). Raises ValueError for a stack holding two, naming them (``what``: the
    method's adapters in words; ``hint``: what to do instead)."""
    rows: list[str | None] = []
    for entry in entries:
        found = [n for n in (entry if isinstance(entry, tuple) else (entry,)) if n is not None and n in held]
        if len(found) > 1:
            raise ValueError(f"a row stacks {what} {found}: a stack can hold at most one{hint}")
        rows.append(found[0] if found else None)
    return rows


def _slot_level(slots: list[int], device: Callable[[], torch.device]) -> int | MixedRows:
    first = slots[0] if slots else 0
    if all(s == first for s in slots):
        return first
    uniq = sorted(set(slots))
    pos = {s: i for i, s in enumerate(uniq)}
    where = device()
    return MixedRows(
        idx=torch.tensor(slots, device=where),
        uniq=uniq,
        inv=torch.tensor([pos[s] for s in slots], device=where),
    )


def repeats(routed: int, n: int) -> int:
    """How many times ``generate`` repeated each of ``routed`` rows to make a batch of ``n`` (beams,
    ``num_return_sequences``: each row's copies are adjacent).

    Raises:
        RuntimeError: ``n`` is not a multiple of the routed rows.
    """
    if n % routed:
        raise RuntimeError(
            f"routed batch has {routed} rows but a layer received {n}: a batch size the routing cannot map "
            "(expected a multiple of the routed rows)."
        )
    return n // routed


class StaticSlot:
    """One LoRA slot for every row, held in a 1-element tensor: a compiled model reads it as data, so
    switching adapters (writing the tensor in place) needs no recompilation. Layers then compute at the
    stacks' full rank (the rows past an adapter's rank are zeros), which is what makes shapes static."""

    __slots__ = ("slot",)

    def __init__(self, device: torch.device) -> None:
        self.slot = torch.zeros(1, dtype=torch.long, device=device)


class _Local(threading.local):
    """Per-thread state of one model's calls. ``__init__`` runs once in every thread that touches it, so
    the attributes always exist there: no missing-attribute look-up (~0.7 µs) on the hot path, and
    ``torch.compile`` guards on the thread's own values (class-level defaults would be guarded instead)."""

    def __init__(self) -> None:
        self.call: dict[str, object] | None = None  # this thread's call in progress; None: the default
        # the prefix bank's keys/values of the backbone call (its own type: the core does not know it)
        self.prefix_context: Any = None


class Route:
    """What every bank needs to know about the current call.

    Routing keys (read with :meth:`get`):
        <method name>: that method's selection for the call (see each method's ``selection``; e.g.
            LoRA's slot, :class:`StaticSlot` or :class:`MixedRows`).
        name: the routing entry plain calls use (the active adapter), kept with the selections it made
            so that a call reads both from one snapshot.

    Attributes:
        default: the process-wide routing (``{key: value}``), replaced whole by :meth:`set_default`.
        strategy: how mixed LoRA rows are computed (:data:`ROUTING_STRATEGIES`): ``"gather"`` (gather
            each row's A/B from a stacked bank, then two batched matmuls), ``"group"`` (one matmul per
            distinct adapter) or ``"segment"`` (rows sorted by adapter, grouped matmuls).
            A setting of the model, shared by every thread.
        local: thread-local storage; ``local.call`` is the routing of this thread's call in progress
            (None: the default); ``local.prefix_context`` is the prefix bank's per-call scratch.
    """

    __slots__ = ("default", "local", "strategy")

    def __init__(self) -> None:
        # each method adds its idle selection when the model creates it
        self.default: dict[str, object] = {"name": None}
        self.strategy: str = "gather"
        self.local = _Local()

    def get(self, key: str) -> Any:
        """The routing of ``key`` for this thread: its call's, else the default. The banks' one accessor
        (a thread-local read and a dict look-up per layer call).

        Returns ``Any``: the type depends on the key (each method's selection type), so a reader declares
        it (``sel: LoraSelection = route.get("lora")``) instead of narrowing on every layer call."""
        call = self.local.call
        return (self.default if call is None else call).get(key)

    @contextmanager
    def scoped(self, selections: dict[str, object]) -> Iterator[dict[str, object]]:
        """Route this thread's calls inside the block (``{method name: its selection}``, on top of the
        routing in force here); restore this thread's previous routing afterwards. ``scoped({})`` pins
        a snapshot of the default for the block, so an ``activate`` in another thread cannot switch
        adapters in the middle of this call. Yields the routing in force."""
        local = self.local
        saved = local.call
        call = {**(self.default if saved is None else saved), **selections}
        local.call = call
        try:
            yield call
        finally:
            local.call = saved

    def recompute_contexts(
        self,
    ) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant): called as a checkpointed layer runs
        forward, it returns a no-op context for that forward and one that restores this thread's routing
        and per-call state as they are now for the layer's recomputation during backward (which runs after
        the call's own routing has ended). So a recomputed layer sees the rows' adapters its forward saw."""
        saved = (self.local.call, self.local.prefix_context)
        return contextlib.nullcontext(), self._as_of(saved)

    @contextlib.contextmanager
    def _as_of(self, saved: tuple[dict[str, object] | None, Any]) -> Iterator[None]:
        local = self.local
        before = (local.call, local.prefix_context)
        local.call, local.prefix_context = saved
        try:
            yield
        finally:
            local.call, local.prefix_context = before

    def set_default(self, selections: dict[str, object]) -> None:
        """The routing used by plain calls (no ``adapters=``) of every thread: O(1), and one assignment,
        so a reader sees the old default or the new one, never a mix."""
        self.default = {**self.default, **selections}

    # copy.deepcopy / pickling of a model: a threading.local cannot be copied; calls in progress
    # belong to their threads, so a copy starts with the default only.
    def __getstate__(self) -> dict[str, Any]:
        return {"default": self.default, "strategy": self.strategy}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.default = state["default"]
        self.strategy = state["strategy"]
        self.local = _Local()
