"""The composer: one base model in memory, many registry adapters, switched and routed at inference.

``Composer`` keeps an :class:`AdapterModel` and a registry. Adapters are named by registry references
(``"news"`` = latest, ``"news@2"``, ``"news@prod"``); a reference is resolved once, when first loaded,
so switching later never touches the registry. Loaded adapters live in an LRU set bounded by a byte
and/or count budget; an evicted adapter is reloaded transparently on its next use, a pinned one is never
evicted. ``use`` switches the adapter of plain calls in O(1) for every thread, ``using`` for this thread
only; ``predict`` and ``generate`` route a different adapter per row through the core's routing path;
``merge`` builds a new adapter (or folds one into the base weights) from registry adapters. One Composer
serves many threads at once (see :class:`Composer`).

The loading, eviction and in-use bookkeeping is the :class:`~adapters_mtl.serving.adapter_cache.AdapterCache`
(``composer.cache``); this module is the pipeline on top of it: check the rows' references, hold their
adapters for the call, tokenize, run the routed model, label or decode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..core.config import text_config
from ..data.batching import pad
from ..model import AdapterModel
from .adapter_cache import AdapterCache, ComposerError, Entry, entry_members, row_entries
from .merging import DEFAULT_MERGE_METHOD, merge_adapters

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..registry import AdapterRegistry

__all__ = ["Composer", "ComposerError", "Prediction"]

_FOLDED = "folded-into-base"


@dataclass(frozen=True)
class Prediction:
    """One row of :meth:`Composer.predict`: the label, its probability, every label's probability."""

    adapter: str
    label: str
    score: float
    scores: dict[str, float] = field(repr=False)


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

    Attributes:
        model: the :class:`AdapterModel` every call runs.
        cache: the :class:`~adapters_mtl.serving.adapter_cache.AdapterCache` of its adapters (loading,
            LRU eviction, pins, in-use counts).
        tokenizer: the tokenizer given or loaded with the base (None: text calls raise ComposerError).

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
        base: str | torch.nn.Module,
        registry: AdapterRegistry | str | None = "default",
        tokenizer: PreTrainedTokenizerBase | None = None,
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
        if registry is not None and not isinstance(registry, AdapterRegistry):
            registry = AdapterRegistry(None if registry == "default" else registry)
        self.cache = AdapterCache(self.model, registry, max_bytes=max_bytes, max_adapters=max_adapters)

    @property
    def registry(self) -> AdapterRegistry | None:
        """The registry adapters are loaded from (None: only adapters attached by hand)."""
        return self.cache.registry

    @registry.setter
    def registry(self, value: AdapterRegistry | None) -> None:
        self.cache.registry = value

    @property
    def max_bytes(self) -> int | None:
        """Byte budget of registry adapters (None: unbounded); checked at the next load."""
        return self.cache.max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        self.cache.max_bytes = value

    @property
    def max_adapters(self) -> int | None:
        """Count budget of registry adapters (None: unbounded); checked at the next load."""
        return self.cache.max_adapters

    @max_adapters.setter
    def max_adapters(self, value: int | None) -> None:
        self.cache.max_adapters = value

    # ------------------------------------------------------------------ loading
    @property
    def loaded(self) -> list[dict]:
        """Loaded adapters, least recently used first: name, ref, bytes, pinned."""
        return self.cache.loaded

    def load(self, ref: str, pin: bool = False) -> str:
        """Attach ``ref`` from the registry (if not attached yet); returns its name in the model.

        The adapter is attached as ``name`` when that is free, else as ``name-vN``.

        Raises:
            ComposerError: no registry; the budget cannot hold it without evicting pinned or in-use adapters.
            RegistryError / AdapterFileError: unknown ref, damaged files, adapter of another base model.
        """
        return self.cache.load(ref, pin=pin)

    def unload(self, ref: str) -> None:
        """Detach ``ref`` (an evicted or unloaded adapter reloads on its next use).

        Raises:
            ComposerError: ``ref`` is not loaded, or a call or ``using()`` block is using it.
        """
        self.cache.unload(ref)

    def pin(self, ref: str, pinned: bool = True) -> None:
        """Never evict ``ref`` (loading it first if needed); ``pinned=False`` makes it evictable again."""
        self.cache.pin(ref, pinned)

    def resolve(self, refs: str | Sequence[str]) -> list[str]:
        """Attach ``refs`` (registry references or attached names; loading what is missing) and return
        their names in the model, in order. The adapters are not held: a later load in another thread
        may evict them (calls hold theirs; see :meth:`using` and ``predict(adapters=...)``).

        Raises:
            ComposerError: an entry that is not a reference; no registry; a budget that cannot hold them.
            RegistryError / AdapterFileError: as :meth:`load`.
        """
        refs = [refs] if isinstance(refs, str) else list(refs)
        bad = [f"row {i}: got {type(r).__name__} {r!r}" for i, r in enumerate(refs) if not isinstance(r, str)]
        if bad:
            raise ComposerError(
                f"{'; '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. Expected registry references "
                "('news', 'news@2', 'news@prod') or names of attached adapters."
            )
        return self.cache.resolve(refs)

    # ------------------------------------------------------------------ switching
    @property
    def active(self) -> str | tuple[str, ...] | None:
        """The model name of the adapter this thread's plain calls use (its ``using()`` block's, else the
        default set by :meth:`use`)."""
        return self.model.active_adapter

    def use(self, ref: Entry) -> Entry:
        """Make ``ref`` the adapter of plain calls of every thread (``None``: the bare base). O(1) once
        loaded: a dict look-up and the model's :meth:`~AdapterModel.activate`."""
        with self.cache.lock:
            name = self.cache.resolve_entries(row_entries(ref, 1, single=True))[0]
            self.model.activate(name)
            return name

    @contextmanager
    def using(self, ref: Entry) -> Iterator[Entry]:
        """``with composer.using("news"):`` — plain calls of *this thread* use ``ref`` inside the block, and
        its previous adapter after it; other threads and the default of :meth:`use` are untouched. The
        adapter is held (never evicted) while the block runs. O(1) once loaded.

        Per thread: an asyncio task must not hold the block across an ``await`` (pass ``adapters=``).
        """
        with self._lease(ref, 1, single=True) as names, self.model.using(names[0]) as name:
            yield name

    # ------------------------------------------------------------------ inference
    @property
    def device(self) -> torch.device:
        """The device of the base model's weights (where inputs go)."""
        return next(self.model.base.parameters()).device

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """``texts`` as one padded batch of tensors on :attr:`device` (``input_ids``, ``attention_mask``,
        ...), each text truncated to ``max_length`` tokens (at most the tokenizer's ``model_max_length``;
        None: that maximum).

        Raises:
            ComposerError: no tokenizer.
        """
        tok = self._tokenizer()
        fit = {} if max_length is None else {"max_length": min(max_length, tok.model_max_length)}
        enc = tok(list(texts), padding=True, truncation=True, return_tensors="pt", **fit)
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.no_grad()
    def predict(
        self, texts: str | Sequence[str], adapters: Entry | Sequence[Entry] = None, batch_size: int = 32
    ) -> list[Prediction]:
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
            self._tokenizer()  # no tokenizer: say so even for no texts
            out: list[Prediction] = []
            for start in range(0, len(texts), batch_size):
                rows = names[start : start + batch_size]
                limit = self._positions()
                enc = self.tokenize(
                    texts[start : start + batch_size],
                    None if limit is None else limit[1] - self._prefix_length(rows),
                )
                result = self.model(**enc, adapters=rows)
                row_heads = heads[start : start + batch_size]
                for name, head, logits in zip(rows, row_heads, result.row_logits, strict=True):
                    probs = torch.softmax(logits.float(), -1).cpu()
                    labels = self._labels(head, probs.numel())
                    best = int(probs.argmax())
                    out.append(
                        Prediction(
                            self._ref_of(name),
                            labels[best],
                            float(probs[best]),
                            dict(zip(labels, probs.tolist(), strict=True)),
                        )
                    )
            return out

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        adapters: Entry | Sequence[Entry] = None,
        max_new_tokens: int = 32,
        **generation_kwargs: Any,
    ) -> list[str]:
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
            enc = {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}
            self._check_room(enc["input_ids"].shape[1], max_new_tokens, names)
            generation_kwargs.setdefault("do_sample", False)
            generation_kwargs.setdefault(
                "pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            )
            ids = self.model.generate(
                **enc, adapters=names, max_new_tokens=max_new_tokens, **generation_kwargs
            )
        return tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    # ------------------------------------------------------------------ merging
    def merge(
        self,
        refs: Sequence[str],
        weights: Sequence[float] | None = None,
        method: str = DEFAULT_MERGE_METHOD,
        into: str = "merged",
        **kwargs: Any,
    ) -> str:
        """Merge registry adapters (see :func:`adapters_mtl.serving.merging.merge_adapters` for methods and
        options; the default ``cat`` is exact and takes any ranks).

        ``into="base"`` folds the result into the base weights (undo with :meth:`unmerge`); any other name
        adds a new adapter (publishable with ``registry.publish(composer.model, adapter=into)``).
        Nothing is changed when the merge fails.

        Raises:
            ComposerError: ``into="base"`` while calls or ``using()`` blocks are in flight (folding changes
                the weights they share), or while another adapter is folded in.
        """
        with self.cache.lock:
            names = self.cache.resolve(list(refs))
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
            self.cache.adopt(into)
            return into

    def unmerge(self) -> None:
        """Undo ``merge(..., into="base")`` (bit-exact).

        Raises:
            ComposerError: while calls or ``using()`` blocks are in flight.
        """
        with self.cache.lock:
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
    @contextmanager
    def _lease(self, adapters: Any, n: int, single: bool = False) -> Iterator[list[Entry]]:
        """Resolve (and load) one call's adapters and hold them until it ends: while held they are in use,
        so no other thread's load evicts them. The cache's lock is not held while the call itself runs."""
        with self.cache.lock:  # resolve and hold in one step: no other thread's load evicts in between
            if single:  # using(ref): None is the bare base
                names = self.cache.resolve_entries(row_entries(adapters, 1, single=True))
            elif adapters is None:  # a call without adapters: this thread's active adapter
                names = [self.model.active_adapter] * n
            else:
                names = self.cache.resolve_entries(row_entries(adapters, n))
            lease = self.cache.hold(names)
        with lease:
            yield names

    def _refuse_in_flight(self, what: str) -> None:
        if self.cache.in_flight:
            raise ComposerError(
                f"{what} changes the base weights every call shares: refused while {self.cache.in_flight} "
                "call(s) or using() block(s) are in flight in other threads; retry when they end"
            )

    def _head(self, entry: Entry) -> str | None:
        """The adapter whose head labels a row: its own, or a stack's last adapter that has one."""
        return next(
            (m for m in reversed(entry_members(entry)) if self.model.head_config(m) is not None), None
        )

    def _ref_of(self, entry: Entry) -> str:
        return "+".join(self.cache.ref(m) for m in entry_members(entry))

    def _positions(self) -> tuple[str, int] | None:
        """(config name, value) of the base's number of positions, if it has a fixed one."""
        cfg = text_config(self.model.config)
        for key in ("max_position_embeddings", "n_positions"):
            if isinstance(getattr(cfg, key, None), int):
                return key, getattr(cfg, key)
        return None

    def _prefix_length(self, names: Sequence[Entry]) -> int:
        """The longest prefix among ``names`` (its tokens take positions before the text's)."""
        rows = {e if isinstance(e, tuple) else (e,) for e in names}
        return max(
            (sum(self.model.added_positions(m) for m in row if m is not None) for row in rows), default=0
        )

    def _check_room(self, prompt_len: int, max_new_tokens: int, names: Sequence[Entry]) -> None:
        limit = self._positions()
        prefix = self._prefix_length(names)
        if limit is not None and prompt_len + max_new_tokens + prefix > limit[1]:
            raise ComposerError(
                f"generate() would need {prompt_len + max_new_tokens + prefix} positions but the base has "
                f"{limit[0]}={limit[1]}: the longest prompt has {prompt_len} tokens, max_new_tokens={max_new_tokens}"
                f"{f', the longest prefix {prefix} tokens' if prefix else ''}. Shorten the prompts or lower "
                "max_new_tokens."
            )

    def _labels(self, name: str | None, n: int) -> list[str]:
        head = self.model.head_config(name) if name is not None else None
        names = list(head.label_names) if head is not None and head.label_names else []
        return names if len(names) == n else [str(i) for i in range(n)]

    def _tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ComposerError(
                "this composer has no tokenizer: pass tokenizer=... (the packaged bases load their own)"
            )
        return self.tokenizer
