"""The composer: one base model in memory, many registry adapters, switched and routed at inference.

``Composer`` keeps an :class:`AdapterModel` and a registry. Adapters are named by registry references
(``"news"`` = latest, ``"news@2"``, ``"news@prod"``); a reference is resolved once, when first loaded,
so switching later never touches the registry. Loaded adapters live in an LRU set bounded by a byte
and/or count budget; an evicted adapter is reloaded transparently on its next use, a pinned one is never
evicted. ``use`` switches the adapter of plain calls in O(1) for every thread, ``using`` for this thread
only; ``predict`` and ``generate`` route a different adapter per row through the core's routing path;
``merge`` builds a new adapter (or folds one into the base weights) from registry adapters. One Composer
serves many threads at once (see :class:`Composer`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..core.model import AdapterModel, routing_entry_problem
from ..data.batching import pad
from .merging import merge_adapters

__all__ = ["Composer", "ComposerError", "Prediction"]

_FOLDED = "folded-into-base"


class ComposerError(ValueError):
    """A composer request that cannot be served: says what was asked, what exists, and what to do."""


@dataclass(frozen=True)
class Prediction:
    """One row of :meth:`Composer.predict`: the label, its probability, every label's probability."""

    adapter: str
    label: str
    score: float
    scores: dict[str, float] = field(repr=False)


@dataclass
class _Entry:
    name: str  # the adapter's name in the model
    ref: str  # the canonical registry reference (name@version), or the name for local adapters
    nbytes: int
    pinned: bool = False
    from_registry: bool = True
    in_use: int = 0  # calls and using() blocks holding it right now (never evicted while > 0)


class Composer:
    """Serve many adapters on one base model.

    Args:
        base: ``"minilm"``, ``"smollm2"``, a local model folder, a loaded transformers model, or an
            :class:`AdapterModel` (adapters already attached stay usable by name).
        registry: an :class:`~adapters_mtl.registry.AdapterRegistry`, a registry root / fsspec URL,
            ``"default"`` (the user registry) or None (only adapters attached by hand).
        tokenizer: the base model's tokenizer (loaded with the packaged models; needed for text calls).
        max_bytes / max_adapters: LRU budget for registry adapters (None: unbounded).
        static_routing: keep the active LoRA slot in a tensor so a ``torch.compile``d base switches adapters
            without recompiling (see :meth:`AdapterModel.static_routing`; a recompile happens only when a
            loaded adapter raises the largest rank).

    Threads — safe to do concurrently from many threads:
        * ``predict`` / ``generate`` with different adapters (routed per row, by ``using()``, or the
          default): each call's routing is its own (the model holds it per thread), so each answer equals
          the same call made alone.
        * ``using(ref)``: per thread; it never changes what other threads' plain calls use.
        * ``load`` / ``unload`` / ``pin`` / ``use``, and the loads and LRU evictions that calls trigger:
          the adapter cache is guarded by one lock, and every adapter a call or a ``using()`` block is
          using is held (an in-use count) until it ends, so it is never evicted under it. When the
          adapters held by other threads keep the cache over its budget, the budget is exceeded for
          that moment (by at most the adapters in use) and met again as those calls end; a request that
          cannot fit on its own (with the pinned and default adapters) fails with a ComposerError.
          ``unload`` of an adapter in use is refused.
        * ``use(ref)`` switches the default of plain calls for every thread; a call in progress keeps
          the adapter it started with (with ``static_routing`` the slot tensor is written in place, so
          switch between calls there).

    Not thread-safe by design: ``merge(..., into="base")`` and ``unmerge()`` change the weights every
    call shares, so they are refused (ComposerError) while any call or ``using()`` block is in flight,
    and calls that start meanwhile wait for them. Direct calls of ``composer.model`` bypass the cache's
    bookkeeping: they are safe among themselves (see :class:`AdapterModel`), but nothing holds their
    adapters against eviction.
    """

    def __init__(
        self,
        base,
        registry="default",
        tokenizer=None,
        max_bytes: int | None = None,
        max_adapters: int | None = None,
        static_routing: bool = False,
    ) -> None:
        from ..registry import AdapterRegistry

        if isinstance(base, str):
            from ..data.bases import load_base

            base, loaded_tokenizer = load_base(base)
            tokenizer = tokenizer or loaded_tokenizer
        self.model = base if isinstance(base, AdapterModel) else AdapterModel(base)
        self.model.eval()
        if static_routing:
            self.model.static_routing(True)
        self.tokenizer = tokenizer
        if registry is None or isinstance(registry, AdapterRegistry):
            self.registry = registry
        else:
            self.registry = AdapterRegistry(None if registry == "default" else registry)
        self.max_bytes, self.max_adapters = max_bytes, max_adapters
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # by model name, least recent first
        self._refs: dict[str, str] = {}  # every reference seen → model name
        # Guards _entries, _refs, in-use counts and every attach/detach (re-entrant: load → _fit_budget).
        # Held while resolving, never while a model call runs, so calls in other threads proceed.
        self._lock = threading.RLock()
        self._calls = 0  # predict/generate calls and using() blocks in flight
        for name in self.model.adapter_names:
            self._adopt(name)

    # ------------------------------------------------------------------ loading
    @property
    def loaded(self) -> list[dict]:
        """Loaded adapters, least recently used first: name, ref, bytes, pinned."""
        with self._lock:
            return [
                {"name": e.name, "ref": e.ref, "bytes": e.nbytes, "pinned": e.pinned}
                for e in self._entries.values()
            ]

    def load(self, ref: str, pin: bool = False) -> str:
        """Attach ``ref`` from the registry (if not attached yet); returns its name in the model.

        The adapter is attached as ``name`` when that is free, else as ``name-vN``.

        Raises:
            ComposerError: no registry; the budget cannot hold it without evicting pinned or in-use adapters.
            RegistryError / AdapterFileError: unknown ref, damaged files, adapter of another base model.
        """
        with self._lock:
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
            ComposerError: ``ref`` is not loaded, or a call or ``using()`` block is using it.
        """
        with self._lock:
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
        with self._lock:
            self._entries[self.load(ref)].pinned = pinned

    # ------------------------------------------------------------------ switching
    @property
    def active(self) -> str | None:
        """The model name of the adapter this thread's plain calls use (its ``using()`` block's, else the
        default set by :meth:`use`)."""
        return self.model.active_adapter

    def use(self, ref: str | None) -> str | None:
        """Make ``ref`` the adapter of plain calls of every thread (``None``: the bare base). O(1) once
        loaded: a dict look-up and the model's :meth:`~AdapterModel.activate`."""
        with self._lock:
            name = self._resolve(self._checked_entries(ref, 1, single=True))[0]
            self.model.activate(name)
            return name

    @contextmanager
    def using(self, ref: str | None) -> Iterator[str | None]:
        """``with composer.using("news"):`` — plain calls of *this thread* use ``ref`` inside the block, and
        its previous adapter after it; other threads and the default of :meth:`use` are untouched. The
        adapter is held (never evicted) while the block runs. O(1) once loaded.

        Per thread: an asyncio task must not hold the block across an ``await`` (pass ``adapters=``).
        """
        with self._lease(ref, 1, single=True) as names, self.model.using(names[0]) as name:
            yield name

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, texts: Sequence[str], adapters=None, batch_size: int = 32) -> list[Prediction]:
        """Classify ``texts``; ``adapters`` is one reference per row, one for all rows, or None (the active
        adapter). Each row gets its adapter's head and label names; rows are routed in one batch.

        A row entry may also be a tuple of references (a stack: its LoRA updates add up, the head of the
        last adapter with one labels the row; ``Prediction.adapter`` joins the references with ``+``).
        Texts longer than the base's positions (``max_position_embeddings``, less the longest prefix of
        the batch) are truncated to fit, as the tokenizer truncates to its own maximum.

        Raises:
            ComposerError: an adapter without a classification head, no tokenizer, wrong number of adapters,
                an entry that is not a reference, None or a tuple of references.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        with self._lease(adapters, len(texts)) as names:
            heads = [self._head(n) for n in names]
            headless = sorted({n for n, h in zip(names, heads, strict=True) if h is None}, key=str)
            if headless:
                raise ComposerError(
                    f"adapters {headless} have no classification head, so predict() cannot label with them; "
                    "use generate() for causal-LM adapters, or load adapters trained with a head"
                )
            tok = self._tokenizer()
            out: list[Prediction] = []
            for start in range(0, len(texts), batch_size):
                rows = names[start : start + batch_size]
                limit = self._positions()
                fit = {} if limit is None else {"max_length": min(limit[1] - self._prefix_length(rows), tok.model_max_length)}  # fmt: skip
                enc = tok(texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt", **fit)  # fmt: skip
                enc = {k: v.to(self._device()) for k, v in enc.items()}
                result = self.model(**enc, adapters=rows)
                row_heads = heads[start : start + batch_size]
                for name, head, logits in zip(rows, row_heads, result.row_logits, strict=True):
                    probs = torch.softmax(logits.float(), -1).cpu()
                    labels = self._labels(head, probs.numel())
                    best = int(probs.argmax())
                    out.append(Prediction(self._ref_of(name), labels[best], float(probs[best]),
                                          dict(zip(labels, probs.tolist(), strict=True))))  # fmt: skip
            return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], adapters=None, max_new_tokens: int = 32, **generation_kwargs) -> list[str]:  # fmt: skip
        """Continue ``prompts`` (greedy by default) with one adapter per row; returns the new text of each row.

        ``generation_kwargs`` go to ``transformers``' ``generate`` (e.g. ``do_sample=True``, ``num_beams=2``).

        Raises:
            ComposerError: the longest prompt plus ``max_new_tokens`` (plus the longest prefix) needs more
                positions than the base has (``max_position_embeddings``); no tokenizer; bad adapters.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._lease(adapters, len(prompts)) as names:
            tok = self._tokenizer()
            # left padding: generation continues from the right edge
            enc = pad(tok, [{"input_ids": ids} for ids in tok(prompts)["input_ids"]], "left")
            enc = {k: enc[k].to(self._device()) for k in ("input_ids", "attention_mask")}
            self._check_room(enc["input_ids"].shape[1], max_new_tokens, names)
            generation_kwargs.setdefault("do_sample", False)
            generation_kwargs.setdefault("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)  # fmt: skip
            ids = self.model.generate(
                **enc, adapters=names, max_new_tokens=max_new_tokens, **generation_kwargs
            )
        return tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    # ------------------------------------------------------------------ merging
    def merge(
        self,
        refs: Sequence[str],
        weights: Sequence[float] | None = None,
        method: str = "linear",
        into: str = "merged",
        **kwargs,
    ) -> str:
        """Merge registry adapters (see :func:`adapters_mtl.serving.merging.merge_adapters` for methods and options).

        ``into="base"`` folds the result into the base weights (undo with :meth:`unmerge`); any other name
        adds a new adapter (publishable with ``registry.publish(composer.model, adapter=into)``).
        Nothing is changed when the merge fails.

        Raises:
            ComposerError: ``into="base"`` while calls or ``using()`` blocks are in flight (folding changes
                the weights they share), or while another adapter is folded in.
        """
        with self._lock:
            names = self._resolve(list(refs))
            if into == "base":
                self._refuse_in_flight("merge(..., into='base')")
                if self.model.merged_adapter is not None:
                    raise ComposerError(
                        f"{self.model.merged_adapter!r} is already folded into the base; unmerge() first"
                    )
                merge_adapters(self.model, names, weights, method, into=_FOLDED, **kwargs)
                try:
                    self.model.merge(_FOLDED)
                except Exception:
                    self.model.remove_adapter(_FOLDED)
                    raise
                return _FOLDED
            merge_adapters(self.model, names, weights, method, into=into, **kwargs)
            self._adopt(into)
            return into

    def unmerge(self) -> None:
        """Undo ``merge(..., into="base")`` (bit-exact).

        Raises:
            ComposerError: while calls or ``using()`` blocks are in flight.
        """
        with self._lock:
            if self.model.merged_adapter is None:
                return
            self._refuse_in_flight("unmerge()")
            if self.model.merged_adapter == _FOLDED:
                self.model.unmerge()
                self.model.remove_adapter(_FOLDED)
                self.model.activate(None)
            else:
                self.model.unmerge()

    # ------------------------------------------------------------------ internals
    def _known(self, ref: str) -> str | None:
        if ref in self._refs and self._refs[ref] in self._entries:
            return self._refs[ref]
        return None

    def _resolve(self, refs: list) -> list:
        """Checked entries (reference, None, tuple of references = a stack) → model entries, loading what is
        missing (LRU-evicting others, never these). Called with the lock held."""
        flat = list(dict.fromkeys(r for e in refs for r in _members(e)))
        names = {r: self._known(r) for r in flat}
        protect = {n for n in names.values() if n is not None}
        for ref in flat:
            if names[ref] is None:
                names[ref] = self._known(ref) or self._load(ref, protect=protect)
                protect.add(names[ref])
        for name in dict.fromkeys(names.values()):
            self._touch(name)
        return [tuple(names[r] for r in e) if isinstance(e, tuple) else None if e is None else names[e] for e in refs]  # fmt: skip

    def _checked_entries(self, adapters, n: int, single: bool = False) -> list:
        """``adapters`` as one entry per row: one entry (a reference, None, a tuple = a stack; always with
        ``single``) for all ``n`` rows, or one per row. Every malformed entry is reported at once, before
        anything is loaded."""
        single = single or adapters is None or isinstance(adapters, (str, tuple)) or not hasattr(adapters, "__iter__")  # fmt: skip
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

    def _row_adapters(self, adapters, n: int) -> list:
        """One model entry per row (loading what is missing); None: this thread's active adapter."""
        if adapters is None:
            return [self.model.active_adapter] * n
        return self._resolve(self._checked_entries(adapters, n))

    @contextmanager
    def _lease(self, adapters, n: int, single: bool = False) -> Iterator[list]:
        """Resolve (and load) one call's adapters and hold them until it ends: while held they are in use,
        so no other thread's load evicts them. The lock is not held while the call itself runs."""
        with self._lock:
            if single:  # using(ref): None is the bare base
                names = self._resolve(self._checked_entries(adapters, 1, single=True))
            else:  # a call: None is this thread's active adapter
                names = self._row_adapters(adapters, n)
            held = [self._entries[m] for m in dict.fromkeys(m for e in names for m in _members(e)) if m in self._entries]  # fmt: skip
            for e in held:
                e.in_use += 1
            self._calls += 1
        try:
            yield names
        finally:
            with self._lock:
                self._calls -= 1
                for e in held:
                    e.in_use -= 1
                self._fit_budget(protect=(), strict=False)  # evict what others' calls kept over budget

    def _refuse_in_flight(self, what: str) -> None:
        if self._calls:
            raise ComposerError(
                f"{what} changes the base weights every call shares: refused while {self._calls} call(s) or "
                "using() block(s) are in flight in other threads; retry when they end"
            )

    def _head(self, entry) -> str | None:
        """The adapter whose head labels a row: its own, or a stack's last adapter that has one."""
        return next((m for m in reversed(_members(entry)) if self.model.head_config(m) is not None), None)

    def _ref_of(self, entry) -> str:
        refs = [self._entries[m].ref if m in self._entries else m for m in _members(entry)]
        return "+".join(refs)

    def _positions(self) -> tuple[str, int] | None:
        """(config name, value) of the base's number of positions, if it has a fixed one."""
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for key in ("max_position_embeddings", "n_positions"):
            if isinstance(getattr(cfg, key, None), int):
                return key, getattr(cfg, key)
        return None

    def _prefix_length(self, names) -> int:
        """The longest prefix among ``names`` (its tokens take positions before the text's)."""
        rows = {e if isinstance(e, tuple) else (e,) for e in names}
        return max(
            (sum(self.model.added_positions(m) for m in row if m is not None) for row in rows), default=0
        )

    def _check_room(self, prompt_len: int, max_new_tokens: int, names) -> None:
        limit = self._positions()
        prefix = self._prefix_length(names)
        if limit is not None and prompt_len + max_new_tokens + prefix > limit[1]:
            raise ComposerError(
                f"generate() would need {prompt_len + max_new_tokens + prefix} positions but the base has "
                f"{limit[0]}={limit[1]}: the longest prompt has {prompt_len} tokens, max_new_tokens={max_new_tokens}"
                f"{f', the longest prefix {prefix} tokens' if prefix else ''}. Shorten the prompts or lower "
                "max_new_tokens."
            )

    def _load(self, ref: str, protect) -> str:
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

    def _fit_budget(self, protect, strict: bool = True) -> None:
        """Evict least recently used adapters until the budget holds, never pinned, default, in-use or
        ``protect`` ones. Adapters other threads' calls hold may keep it over budget for a while: that is
        allowed (they are evicted as those calls end); ``strict``: fail if ``protect`` cannot fit even so."""

        if self.max_adapters is None and self.max_bytes is None:
            return

        def over(entries) -> bool:
            return (self.max_adapters is not None and len(entries) > self.max_adapters) or (
                self.max_bytes is not None and sum(e.nbytes for e in entries) > self.max_bytes
            )

        registry_entries = [e for e in self._entries.values() if e.from_registry]  # least recent first
        default = set(_members(self.model.default_adapter))
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

    def _adopt(self, name: str) -> None:
        self._entries[name] = _Entry(name, name, self._nbytes(name), from_registry=False)
        self._refs[name] = name

    def _nbytes(self, name: str) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.adapter_parameters(name).values())

    def _touch(self, name: str) -> None:
        if name in self._entries:
            self._entries.move_to_end(name)

    def _labels(self, name: str | None, n: int) -> list[str]:
        head = self.model.head_config(name)
        names = list(head.label_names) if head is not None and head.label_names else []
        return names if len(names) == n else [str(i) for i in range(n)]

    def _tokenizer(self):
        if self.tokenizer is None:
            raise ComposerError(
                "this composer has no tokenizer: pass tokenizer=... (the packaged bases load their own)"
            )
        return self.tokenizer

    def _device(self) -> torch.device:
        return next(self.model.base.parameters()).device


def _members(entry) -> tuple:
    """The adapters of one routing entry (a stack's members; none for None)."""
    return entry if isinstance(entry, tuple) else () if entry is None else (entry,)
