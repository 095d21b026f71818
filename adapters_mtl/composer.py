"""The composer: one base model in memory, many registry adapters, switched and routed at inference.

``Composer`` keeps an :class:`AdapterModel` and a registry. Adapters are named by registry references
(``"news"`` = latest, ``"news@2"``, ``"news@prod"``); a reference is resolved once, when first loaded,
so switching later never touches the registry. Loaded adapters live in an LRU set bounded by a byte
and/or count budget; an evicted adapter is reloaded transparently on its next use, a pinned one is never
evicted. ``use`` / ``using`` switch the adapter of plain calls in O(1); ``predict`` and ``generate`` route
a different adapter per row through the core's routing path; ``merge`` builds a new adapter (or folds
one into the base weights) from registry adapters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .merging import merge_adapters
from .model import AdapterModel
from .training.objectives import pad

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
        from .registry import AdapterRegistry

        if isinstance(base, str):
            from .models import load_base

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
        for name in self.model.adapter_names:
            self._adopt(name)

    # ------------------------------------------------------------------ loading
    @property
    def loaded(self) -> list[dict]:
        """Loaded adapters, least recently used first: name, ref, bytes, pinned."""
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
        name = self._known(ref)
        if name is None:
            name = self._load(ref, protect=())
        if pin:
            self._entries[name].pinned = True
        self._touch(name)
        return name

    def unload(self, ref: str) -> None:
        """Detach ``ref`` (an evicted or unloaded adapter reloads on its next use)."""
        name = self._known(ref)
        if name is None:
            raise ComposerError(f"{ref!r} is not loaded; loaded: {[e.ref for e in self._entries.values()]}")
        self._drop(name)

    def pin(self, ref: str, pinned: bool = True) -> None:
        """Never evict ``ref`` (loading it first if needed); ``pinned=False`` makes it evictable again."""
        self._entries[self.load(ref)].pinned = pinned

    # ------------------------------------------------------------------ switching
    @property
    def active(self) -> str | None:
        """The model name of the adapter plain calls use."""
        return self.model.active_adapter

    def use(self, ref: str | None) -> str | None:
        """Make ``ref`` the adapter of plain calls (``None``: the bare base). O(1) once loaded: a dict look-up
        and the model's :meth:`~AdapterModel.activate`."""
        name = None if ref is None else self._resolve([ref])[0]
        self.model.activate(name)
        return name

    @contextmanager
    def using(self, ref: str | None) -> Iterator[str | None]:
        """``with composer.using("news"):`` — ``use(ref)`` inside the block, the previous adapter after it."""
        previous = self.model.active_adapter
        name = self.use(ref)
        try:
            yield name
        finally:
            self.model.activate(previous if previous in self.model.adapter_names else None)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, texts: Sequence[str], adapters=None, batch_size: int = 32) -> list[Prediction]:
        """Classify ``texts``; ``adapters`` is one reference per row, one for all rows, or None (the active
        adapter). Each row gets its adapter's head and label names; rows are routed in one batch.

        Raises:
            ComposerError: an adapter without a classification head, no tokenizer, wrong number of adapters.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        names = self._row_adapters(adapters, len(texts))
        headless = sorted({n for n in names if n is None or n not in self.model.heads}, key=str)
        if headless:
            raise ComposerError(
                f"adapters {headless} have no classification head, so predict() cannot label with them; "
                "use generate() for causal-LM adapters, or load adapters trained with a head"
            )
        tok = self._tokenizer()
        out: list[Prediction] = []
        for start in range(0, len(texts), batch_size):
            rows = names[start : start + batch_size]
            enc = tok(texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
            enc = {k: v.to(self._device()) for k, v in enc.items()}
            result = self.model(**enc, adapters=rows)
            for name, logits in zip(rows, result.row_logits, strict=True):
                probs = torch.softmax(logits.float(), -1).cpu()
                labels = self._labels(name, probs.numel())
                best = int(probs.argmax())
                out.append(Prediction(self._entries[name].ref if name in self._entries else name, labels[best],
                                      float(probs[best]), dict(zip(labels, probs.tolist(), strict=True))))  # fmt: skip
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], adapters=None, max_new_tokens: int = 32, **generation_kwargs) -> list[str]:  # fmt: skip
        """Continue ``prompts`` (greedy by default) with one adapter per row; returns the new text of each row.

        ``generation_kwargs`` go to ``transformers``' ``generate`` (e.g. ``do_sample=True``, ``num_beams=2``).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        names = self._row_adapters(adapters, len(prompts))
        tok = self._tokenizer()
        # left padding: generation continues from the right edge
        enc = pad(tok, [{"input_ids": ids} for ids in tok(prompts)["input_ids"]], "left")
        enc = {k: enc[k].to(self._device()) for k in ("input_ids", "attention_mask")}
        generation_kwargs.setdefault("do_sample", False)
        generation_kwargs.setdefault("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)  # fmt: skip
        ids = self.model.generate(**enc, adapters=names, max_new_tokens=max_new_tokens, **generation_kwargs)
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
        """Merge registry adapters (see :func:`adapters_mtl.merging.merge_adapters` for methods and options).

        ``into="base"`` folds the result into the base weights (undo with :meth:`unmerge`); any other name
        adds a new adapter (publishable with ``registry.publish(composer.model, adapter=into)``).
        Nothing is changed when the merge fails.
        """
        names = self._resolve(list(refs))
        if into == "base":
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
        """Undo ``merge(..., into="base")`` (bit-exact)."""
        if self.model.merged_adapter == _FOLDED:
            self.model.unmerge()
            self.model.remove_adapter(_FOLDED)
            self.model.activate(None)
        elif self.model.merged_adapter is not None:
            self.model.unmerge()

    # ------------------------------------------------------------------ internals
    def _known(self, ref: str) -> str | None:
        if ref in self._refs and self._refs[ref] in self._entries:
            return self._refs[ref]
        return None

    def _resolve(self, refs: list) -> list:
        """References → model names, loading what is missing (LRU-evicting others, never these)."""
        names = [self._known(r) if isinstance(r, str) else r for r in refs]
        protect = {n for n in names if n is not None}
        for i, ref in enumerate(refs):
            if names[i] is None and isinstance(ref, str):
                names[i] = self._known(ref) or self._load(ref, protect=protect)
                protect.add(names[i])
        for name in dict.fromkeys(n for n in names if isinstance(n, str)):
            self._touch(name)
        return names

    def _row_adapters(self, adapters, n: int) -> list:
        if adapters is None:
            return [self.model.active_adapter] * n
        if isinstance(adapters, str):
            return self._resolve([adapters]) * n
        adapters = list(adapters)
        if len(adapters) != n:
            raise ComposerError(
                f"got {len(adapters)} adapters for {n} rows: pass one per row, or one for all"
            )
        return self._resolve(adapters)

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

    def _fit_budget(self, protect) -> None:
        def over() -> bool:
            registry_entries = [e for e in self._entries.values() if e.from_registry]
            return (self.max_adapters is not None and len(registry_entries) > self.max_adapters) or (
                self.max_bytes is not None and sum(e.nbytes for e in registry_entries) > self.max_bytes
            )

        while over():
            victim = next(
                (
                    e
                    for e in self._entries.values()  # least recently used first
                    if e.from_registry and not e.pinned and e.name not in protect and e.name != self.active
                ),
                None,
            )
            if victim is None:
                raise ComposerError(
                    f"the budget (max_adapters={self.max_adapters}, max_bytes={self.max_bytes}) cannot hold "
                    f"{sorted(protect)} with the pinned/active adapters "
                    f"{[e.ref for e in self._entries.values() if e.pinned or e.name == self.active]}: raise "
                    "the budget, unpin, or route fewer adapters per batch"
                )
            self._drop(victim.name)

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

    def _labels(self, name: str, n: int) -> list[str]:
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
