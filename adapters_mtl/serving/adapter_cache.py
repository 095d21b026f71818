"""The composer's adapter cache: registry references → adapters attached to one model, under a budget.

A reference (``"news"`` = latest, ``"news@2"``, ``"news@prod"``) is resolved once, when first loaded, so
later look-ups never touch the registry. Loaded adapters live in an LRU set bounded by a byte and/or
count budget; an evicted adapter is reloaded transparently on its next use; a pinned one, the model's
default one and one in use are never evicted. Adapters attached in-process (by hand, by a merge) are
*adopted*: reachable by name, counted in :attr:`AdapterCache.loaded`, never evicted.

The cache knows references, the registry and the model's adapter names; it knows nothing of texts,
tokenizers or calls (that is the :class:`~adapters_mtl.serving.composer.Composer`'s pipeline).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..model import AdapterModel, routing_entry_problem

if TYPE_CHECKING:
    from ..registry import AdapterRegistry

__all__ = ["AdapterCache", "ComposerError", "Entry", "entry_members", "row_entries"]

# One row's routing: an adapter (a reference before resolution, a model name after), None (the bare
# base) or a tuple of adapters (a stack, e.g. ("shared", "news")).
Entry = str | tuple[str, ...] | None


class ComposerError(ValueError):
    """A composer request that cannot be served: says what was asked, what exists, and what to do."""


def entry_members(entry: Entry) -> tuple:
    """The adapters of one routing entry (a stack's members; none for None)."""
    return entry if isinstance(entry, tuple) else () if entry is None else (entry,)


def row_entries(adapters: Any, n: int, single: bool = False) -> list[Entry]:
    """``adapters`` checked, as one routing entry per row: one entry (a reference, None, a tuple of
    references = a stack; always with ``single``) for all ``n`` rows, or one per row.

    Raises:
        ComposerError: a wrong number of entries, or entries that are not a reference, None or a tuple of
            references (every malformed entry reported at once, before anything is loaded).
    """
    single = (
        single or adapters is None or isinstance(adapters, (str, tuple)) or not hasattr(adapters, "__iter__")
    )
    rows = [adapters] if single else list(adapters)
    if not single and len(rows) != n:
        raise ComposerError(f"got {len(rows)} adapters for {n} rows: pass one per row, or one for all")
    labels = ["adapters"] if single else [f"row {i}" for i in range(n)]
    problems = [
        f"{at}: {p}"
        for at, e in zip(labels, rows, strict=True)
        if (p := routing_entry_problem(e, "references"))
    ]
    if problems:
        raise ComposerError(
            f"{'; '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}. Expected a registry reference "
            "('news', 'news@2', 'news@prod'), None (the bare base), or a tuple of references (a stack, "
            "e.g. ('shared', 'news')) per row, or one of those for all rows."
        )
    return rows * n if single else rows


@dataclass
class _Entry:
    name: str  # the adapter's name in the model
    ref: str  # the canonical registry reference (name@version), or the name for adopted adapters
    nbytes: int
    pinned: bool = False
    from_registry: bool = True
    in_use: int = 0  # leases holding it right now (never evicted while > 0)


class AdapterCache:
    """Registry adapters attached to ``model`` on demand, least recently used evicted past the budget.

    Args:
        model: the :class:`AdapterModel` adapters are attached to; adapters it already has are adopted.
        registry: an :class:`~adapters_mtl.registry.AdapterRegistry`, or None (only adopted adapters).
        max_bytes / max_adapters: LRU budget for registry adapters (None: unbounded).

    Threads: every method takes :attr:`lock` (a re-entrant lock), so one cache serves many threads. A
    caller that must resolve adapters and act on them in one step (no other thread's load evicting them
    in between) holds ``lock`` around both, e.g. ``with cache.lock: names = cache.resolve(refs);
    lease = cache.hold(names)``. The lock is never held while a model call runs.
    """

    def __init__(
        self,
        model: AdapterModel,
        registry: AdapterRegistry | None,
        max_bytes: int | None = None,
        max_adapters: int | None = None,
    ) -> None:
        self.model = model
        self.registry = registry
        self.max_bytes, self.max_adapters = max_bytes, max_adapters
        # Guards _entries, _refs, in-use counts and every attach/detach (re-entrant: load → _fit_budget).
        self.lock = threading.RLock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # by model name, least recent first
        self._refs: dict[str, str] = {}  # every reference seen → model name
        self._leases = 0  # leases not released yet (calls and using() blocks in flight)
        for name in model.adapter_names:
            self.adopt(name)

    # ------------------------------------------------------------------ queries
    @property
    def loaded(self) -> list[dict]:
        """Loaded adapters, least recently used first: name, ref, bytes, pinned."""
        with self.lock:
            return [
                {"name": e.name, "ref": e.ref, "bytes": e.nbytes, "pinned": e.pinned}
                for e in self._entries.values()
            ]

    @property
    def in_flight(self) -> int:
        """Leases not released yet (see :meth:`hold`)."""
        return self._leases

    def ref(self, name: str) -> str:
        """The canonical reference (``name@version``) of the attached adapter ``name``; ``name`` itself for
        an adopted adapter or one the cache does not track."""
        entry = self._entries.get(name)
        return entry.ref if entry is not None else name

    def from_registry(self, name: str) -> bool:
        """Whether the attached adapter ``name`` was loaded from the registry (False: adopted or untracked)."""
        entry = self._entries.get(name)
        return entry is not None and entry.from_registry

    # ------------------------------------------------------------------ loading
    def load(self, ref: str, pin: bool = False) -> str:
        """Attach ``ref`` from the registry (if not attached yet); returns its name in the model.

        The adapter is attached as ``name`` when that is free, else as ``name-vN``.

        Raises:
            ComposerError: no registry; the budget cannot hold it without evicting pinned or in-use adapters.
            RegistryError / AdapterFileError: unknown ref, damaged files, adapter of another base model.
        """
        with self.lock:
            name = self._known(ref)
            if name is None:
                name = self._load(ref, protect=())
            if pin:
                self._entries[name].pinned = True
            self._touch(name)
            return name

    def unload(self, ref: str) -> None:
        """Detach ``ref`` (an evicted or unloaded adapter reloads on its next use).

        Raises:
            ComposerError: ``ref`` is not loaded, or a lease holds it.
        """
        with self.lock:
            name = self._known(ref)
            if name is None:
                raise ComposerError(
                    f"{ref!r} is not loaded; loaded: {[e.ref for e in self._entries.values()]}"
                )
            if self._entries[name].in_use:
                raise ComposerError(
                    f"{ref!r} is in use by {self._entries[name].in_use} call(s) or using() block(s) right "
                    "now; unload it when they end"
                )
            self._drop(name)

    def pin(self, ref: str, pinned: bool = True) -> None:
        """Never evict ``ref`` (loading it first if needed); ``pinned=False`` makes it evictable again."""
        with self.lock:
            self._entries[self.load(ref)].pinned = pinned

    def adopt(self, name: str) -> None:
        """Track ``name``, an adapter attached to the model in-process (by hand, by a merge): reachable by
        its name, listed in :attr:`loaded`, never evicted."""
        with self.lock:
            self._entries[name] = _Entry(name, name, self._nbytes(name), from_registry=False)
            self._refs[name] = name

    def resolve(self, refs: Sequence[str]) -> list[str]:
        """The names in the model of the references ``refs``, in order, loading what is missing (evicting
        least recently used others, never these) and marking them most recently used.

        Raises:
            ComposerError / RegistryError / AdapterFileError: as :meth:`load`.
        """
        with self.lock:
            flat = list(dict.fromkeys(refs))
            known = {r: self._known(r) for r in flat}
            protect = {n for n in known.values() if n is not None}
            names: dict[str, str] = {}
            for ref in flat:
                names[ref] = known[ref] or self._known(ref) or self._load(ref, protect=protect)
                protect.add(names[ref])
            for name in dict.fromkeys(names.values()):
                self._touch(name)
            return [names[r] for r in refs]

    def resolve_entries(self, entries: Sequence[Entry]) -> list[Entry]:
        """Routing entries of references (a reference, None, or a tuple of references = a stack) → the
        same entries of model names, as :meth:`resolve` (every adapter of the entries protected from the
        evictions their loads cause)."""
        flat = list(dict.fromkeys(r for e in entries for r in entry_members(e)))
        names = dict(zip(flat, self.resolve(flat), strict=True))
        return [
            tuple(names[r] for r in e) if isinstance(e, tuple) else None if e is None else names[e]
            for e in entries
        ]

    def hold(self, entries: Iterable[Entry]) -> ExitStack:
        """Hold the attached adapters of ``entries`` (model names) in use until the returned lease is
        closed (``with lease:`` or ``lease.close()``): no load evicts them and :meth:`unload` refuses them.
        Closing the lease evicts what other leases kept over the budget."""
        with self.lock:
            held = [
                self._entries[m]
                for m in dict.fromkeys(m for e in entries for m in entry_members(e))
                if m in self._entries
            ]
            for e in held:
                e.in_use += 1
            self._leases += 1
        lease = ExitStack()
        lease.callback(self._release, held)
        return lease

    # ------------------------------------------------------------------ internals
    def _release(self, held: list[_Entry]) -> None:
        with self.lock:
            self._leases -= 1
            for e in held:
                e.in_use -= 1
            self._fit_budget(protect=(), strict=False)  # evict what others' calls kept over budget

    def _known(self, ref: str) -> str | None:
        if ref in self._refs and self._refs[ref] in self._entries:
            return self._refs[ref]
        return None

    def _load(self, ref: str, protect: Iterable[str]) -> str:
        if self.registry is None:
            raise ComposerError(
                f"{ref!r} is not attached and this composer has no registry; attached: {self.model.adapter_names}"
            )
        record = self.registry.resolve(ref)
        if record.ref in self._refs and self._refs[record.ref] in self._entries:  # "news" after "news@2"
            self._refs[ref] = self._refs[record.ref]
            return self._refs[ref]
        taken = set(self.model.adapter_names)
        name = record.name if record.name not in taken else f"{record.name}-v{record.version}"
        if name in taken:
            raise ComposerError(f"cannot attach {record.ref}: an adapter named {name!r} is already attached")
        self.registry.load(self.model, record.ref, name=name)
        self._entries[name] = _Entry(name, record.ref, self._nbytes(name))
        self._refs[ref] = self._refs[record.ref] = name
        try:
            self._fit_budget(protect={*protect, name})
        except ComposerError:
            self._drop(name)
            raise
        return name

    def _fit_budget(self, protect: Iterable[str], strict: bool = True) -> None:
        """Evict least recently used adapters until the budget holds, never pinned, default, in-use or
        ``protect`` ones. Adapters other leases hold may keep it over budget for a while: that is allowed
        (they are evicted as those leases end); ``strict``: fail if ``protect`` cannot fit even so."""

        if self.max_adapters is None and self.max_bytes is None:
            return
        protect = set(protect)

        def over(entries: list[_Entry]) -> bool:
            return (self.max_adapters is not None and len(entries) > self.max_adapters) or (
                self.max_bytes is not None and sum(e.nbytes for e in entries) > self.max_bytes
            )

        registry_entries = [e for e in self._entries.values() if e.from_registry]  # least recent first
        default = set(entry_members(self.model.default_adapter))
        keep = [e for e in registry_entries if e.pinned or e.name in protect or e.name in default]
        while over(registry_entries):
            victim = next((e for e in registry_entries if e not in keep and not e.in_use), None)
            if victim is None:
                if strict and over(keep):
                    raise ComposerError(
                        f"the budget (max_adapters={self.max_adapters}, max_bytes={self.max_bytes}) cannot hold "
                        f"{sorted(protect)} with the pinned/active adapters "
                        f"{[e.ref for e in keep if e.name not in protect]}: raise the budget, unpin, or route "
                        "fewer adapters per batch"
                    )
                return  # over only by adapters other calls are using: met again when they end
            self._drop(victim.name)
            registry_entries.remove(victim)

    def _drop(self, name: str) -> None:
        if self.model.merged_adapter == name:
            self.model.unmerge()
        self.model.remove_adapter(name)
        del self._entries[name]
        for ref in [r for r, n in self._refs.items() if n == name]:
            del self._refs[ref]

    def _nbytes(self, name: str) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.adapter_parameters(name).values())

    def _touch(self, name: str) -> None:
        if name in self._entries:
            self._entries.move_to_end(name)
