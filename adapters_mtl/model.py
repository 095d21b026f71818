"""AdapterModel: a frozen transformers model with many named adapters, routed per row.

``model(**batch, adapters=["news", None, "sentiment", ...])`` runs every row with its own adapter (or
the bare base for ``None``) in one batch; training and inference use this same call.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from .core.config import HeadConfig, hidden_size_of, validate_name
from .core.heads import Head, HeadOutput
from .core.module_paths import module_list
from .core.routing import ROUTING_STRATEGIES, Route, StaticSlot
from .methods import Factors, Method, get_method, to_native

__all__ = ["AdapterModel", "AdapterOutput", "routing_entry_problem"]

_UNSET = object()


@dataclass
class AdapterOutput:
    """Output of a call in which at least one row's adapter has a head.

    Attributes:
        last_hidden_state: (B, T, H) the backbone's hidden states.
        heads: ``{adapter name: HeadOutput(rows, logits)}`` for each adapter with a head in the batch.
        row_logits: one logits tensor per row ((K,) or (T, K)); ``None`` for rows without a head.
    """

    last_hidden_state: torch.Tensor
    heads: dict[str, HeadOutput] = field(default_factory=dict)
    row_logits: list[torch.Tensor | None] = field(default_factory=list)


class AdapterModel(nn.Module):
    """Wrap and freeze a transformers model; attach, route, merge and train named adapters.

    Args:
        base: a loaded ``transformers`` model (encoder such as BERT/MiniLM, or decoder such as
            Llama/SmolLM2/GPT-2; bare or with its task head). Every parameter it has is frozen.
        adapter_dtype: the dtype LoRA weights are kept (and computed) in: ``"auto"`` (default) keeps
            them in fp32 on a fp16/bf16 base, as PEFT does, so saved adapters round-trip bit-exact, and
            in the base's dtype otherwise; ``"base"`` always uses the base weight's dtype; or a
            ``torch.dtype``. ``model.to(dtype)`` later converts them like every other parameter.

    Example:
        >>> model = AdapterModel(AutoModel.from_pretrained(path))
        >>> model.add_adapter("news", LoraConfig(r=8), head=HeadConfig(num_labels=5))
        >>> model.add_adapter("tone", PrefixConfig(num_virtual_tokens=8), head=HeadConfig(num_labels=3))
        >>> out = model(**batch, adapters=["news", "tone", None])

    Threads: one model serves concurrent calls. Each call's routing (``forward(adapters=...)``,
    ``generate(adapters=...)``, :meth:`routed`, :meth:`using`) is held per thread, so concurrent
    forward/generate calls with different adapters in different threads are safe and each gets exactly
    what it gets alone. Plain calls read the process-wide default (:meth:`activate`) once, at the start
    of the call, so an ``activate`` in another thread switches the next calls, never half of one in
    progress (except with :meth:`static_routing`, whose slot tensor is written in place: switch between
    calls there). Not synchronised: ``activate``, ``add_adapter``, ``remove_adapter``, ``merge`` and
    ``unmerge`` from several threads at once (serialise them); removing, merging or unmerging an
    adapter while a call or a ``using()`` block of another thread routes to it (that call then computes
    with whatever the slot holds); merging into the base while calls run (it changes the weights every
    call shares). Attaching or detaching *other* adapters while calls run is supported (the Composer's
    LRU does it, with per-adapter in-use counts to keep the adapters of calls in flight attached).
    """

    def __init__(self, base: nn.Module, *, adapter_dtype: str | torch.dtype = "auto") -> None:
        super().__init__()
        if adapter_dtype not in ("auto", "base") and not isinstance(adapter_dtype, torch.dtype):
            raise ValueError(
                f"adapter_dtype={adapter_dtype!r}: expected 'auto', 'base' or a torch.dtype such as torch.float32"
            )
        self._adapter_dtype = adapter_dtype
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.heads = nn.ModuleDict()
        # Methods that keep their parameters outside the base model (prefix) register them here.
        self.method_modules = nn.ModuleDict()
        # the routing every bank reads: the process-wide default (with the active adapter's name) and
        # each thread's call in progress (see adapters_mtl.core.routing)
        self._route = Route()
        self._methods: dict[str, Method] = {}
        self._configs: dict[str, tuple[Any, ...]] = {}
        self._head_configs: dict[str, HeadConfig] = {}
        # {routing entry (a name, a stack or None): every method's selection for it on all rows}
        self._default_selection: dict[str | tuple[str, ...] | None, dict[str, object]] = {}
        self._static: dict[str, StaticSlot] | None = None  # per method, with static_routing()

    # ------------------------------------------------------------------ adapters
    @property
    def lora_dtype(self) -> torch.dtype | None:
        """The dtype new LoRA weights get (None: each layer's weight dtype, see ``adapter_dtype``)."""
        if isinstance(self._adapter_dtype, torch.dtype):
            return self._adapter_dtype
        if self._adapter_dtype == "base":
            return next((p.dtype for p in self.base.parameters() if p.is_floating_point()), None)
        return None

    @property
    def config(self) -> Any:
        """The base model's config."""
        return self.base.config

    @property
    def adapter_names(self) -> list[str]:
        """Names of the attached adapters, in the order they were added."""
        return list(self._configs)

    @property
    def active_adapter(self) -> str | tuple[str, ...] | None:
        """The adapter this thread's plain calls use: the one of an enclosing :meth:`using` block, else the
        process-wide default (:meth:`activate`); None = the bare base."""
        return self._route.get("name")

    @property
    def default_adapter(self) -> str | tuple[str, ...] | None:
        """The process-wide default set by :meth:`activate` (what plain calls use outside ``using`` blocks)."""
        return cast("str | tuple[str, ...] | None", self._route.default["name"])

    @property
    def hidden_size(self) -> int:
        """Width of the base model's hidden states (what heads and discriminators read)."""
        hidden = hidden_size_of(self.base.config)
        if hidden is None:
            raise ValueError(f"cannot read the hidden size from {type(self.base.config).__name__}")
        return hidden

    def adapter_config(self, name: str) -> tuple[Any, ...]:
        """The native configs of ``name`` (one per method)."""
        self._check_known([name])
        return self._configs[name]

    def head_config(self, name: str) -> HeadConfig | None:
        """The head of ``name``, or None if it has none."""
        return self._head_configs.get(name)

    def add_adapter(
        self, name: str, config: Any, head: HeadConfig | None = None, trainable: bool = True
    ) -> None:
        """Attach a new adapter.

        Args:
            name: unique adapter name (letters, digits, ``_``, ``-``).
            config: ``LoraConfig``, ``PrefixConfig``, ``peft.LoraConfig``, ``peft.PrefixTuningConfig``,
                a list of one LoRA and one prefix config (a LoRA+prefix adapter), or ``[]`` with a head (a
                head-only adapter: the rows use the bare base and this head).
            head: an optional task head for this adapter.
            trainable: whether the new parameters require grad.

        Raises:
            ValueError: duplicate name, bad config, targets that match nothing (near matches listed),
                prefix tuning on an unsupported architecture. Nothing is attached on error.
        """
        validate_name(name)
        if name in self._configs:
            raise ValueError(
                f"adapter {name!r} already exists; remove_adapter({name!r}) first or pick another name"
            )
        configs = to_native(config)
        if not configs and head is None:
            raise ValueError(
                f"adapter {name!r} has no config and no head: pass a LoraConfig/PrefixConfig (or a list), "
                "or config=[] with a head for a head-only adapter (e.g. full fine-tuning baselines)"
            )
        done = []
        try:
            for cfg in configs:
                method = self._method(cfg.method)
                method.add(name, cfg)
                done.append(method)
            if head is not None:
                self.heads[name] = self._make_head(head)
                self._head_configs[name] = head
        except Exception:
            for method in done:
                method.remove(name)
            raise
        self._configs[name] = configs
        # new layers and heads follow the model's train/eval mode: only modules that differ are switched
        # (self.train() sets the flag on every module, ~3 ms a load on SmolLM2-135M)
        for module in module_list(self):
            if module.training != self.training:
                module.train(self.training)
        ref = next(self.base.parameters())
        for p in self.adapter_parameters(name).values():
            if p.device != ref.device:
                p.data = p.data.to(ref.device)
            p.requires_grad_(trainable)

    def remove_adapter(self, name: str) -> None:
        """Detach ``name`` and free its memory (unmerging it first if it is merged)."""
        self._check_known([name])
        if self.merged_adapter == name:
            self.unmerge()
        for cfg in self._configs.pop(name):
            self._methods[cfg.method].remove(name)
        if name in self.heads:
            del self.heads[name]
            del self._head_configs[name]
        self._default_selection.pop(name, None)
        if self.default_adapter == name:
            self.activate(None)

    def attach_folded(self, name: str, into: str) -> str:
        """Attach ``name`` in the form serving uses as adapter ``into`` (each part its method's
        :meth:`~adapters_mtl.methods.Method.folded` form, e.g. AdaLoRA as a plain LoRA with per-module ranks;
        other parts as they are), with a copy of ``name``'s head. The outputs are the same. Nothing stays
        attached on error. Returns ``into``."""
        self._check_known([name])
        configs, states = [], {}
        for cfg in self._configs[name]:
            folded = self._methods[cfg.method].folded(name)
            if folded is None:
                configs.append(cfg)
                states.update(
                    {k: p.detach() for k, p in self._methods[cfg.method].adapter_params(name).items()}
                )
            else:
                configs.append(folded[0])
                states.update(folded[1])
        head = self.head_config(name)
        self.add_adapter(into, [self._method(c.method).loading_config(c) for c in configs], head=head)
        try:
            with torch.no_grad():
                params = self.adapter_parameters(into)
                for key, value in states.items():
                    params[key].copy_(value)
                if head is not None:
                    self.heads[into].load_state_dict(self.heads[name].state_dict())
        except Exception:
            self.remove_adapter(into)
            raise
        return into

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Every parameter of ``name`` (all methods and its head), keyed by a stable qualified name."""
        if name not in self.heads:
            self._check_known([name])
        out: dict[str, nn.Parameter] = {}
        for cfg in self._configs.get(name, ()):
            out.update(self._methods[cfg.method].adapter_params(name))
        if name in self.heads:
            out.update({f"heads.{name}.{k}": p for k, p in self.heads[name].named_parameters()})
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that require grad (adapters and heads only: the base is frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    def base_parameters(self) -> dict[str, nn.Parameter]:
        """The base model's own parameters by name (adapter layers wrap base layers, so
        ``base.named_parameters()`` also lists adapter parameters; these are left out)."""
        adapter = {id(p) for n in self._configs for p in self.adapter_parameters(n).values()}
        return {
            n: p
            for n, p in self.base.named_parameters()
            if id(p) not in adapter and not any(m.owns_parameter(n, p) for m in self._methods.values())
        }

    def method_names(self, name: str) -> list[str]:
        """The methods of adapter ``name``'s parts (e.g. ``["lora"]``; ``[]`` for a head-only adapter)."""
        self._check_known([name])
        return [c.method for c in self._configs[name]]

    @property
    def methods(self) -> list[Method]:
        """The method instances of this model (one per method it has held an adapter of)."""
        return list(self._methods.values())

    def method(self, method_name: str) -> Method:
        """The :class:`~adapters_mtl.methods.Method` instance holding this model's adapters of
        ``method_name`` (created on first use)."""
        return self._method(method_name)

    def has_factors(self, name: str) -> bool:
        """Whether every part of ``name`` is a weight update (what merging and stack folding need)."""
        names = self.method_names(name)
        return bool(names) and all(get_method(m).has_factors() for m in names)

    def factors(self, name: str, state: Mapping[str, torch.Tensor] | None = None) -> Factors:
        """``name``'s weight update as ``{module path: (A, B, scale)}`` (ΔW = scale·B·A; detached views of
        the live values, so writing into them under ``no_grad`` changes the adapter). ``state`` (keys as
        :meth:`adapter_parameters`) replaces the live values, e.g. a snapshot.

        Raises:
            ValueError: a part of ``name`` is not a weight update (e.g. a prefix).
        """
        if not self.has_factors(name):
            raise ValueError(
                f"adapter {name!r} is not only weight updates (methods: {self.method_names(name)}): only "
                "adapters whose every part can be merged have factors (prefix tuning has no weight update)"
            )
        out: Factors = {}
        for m in self.method_names(name):
            out.update(self._methods[m].factors(name, state))
        return out

    def added_positions(self, name: str) -> int:
        """Positions ``name`` takes before the text (e.g. a prefix's virtual tokens); 0 for most methods."""
        return sum(self._method(c.method).added_positions(c) for c in self.adapter_config(name))

    @property
    def backbone(self) -> nn.Module:
        """The base model without its task head (``base.base_model``; the base itself when bare)."""
        return getattr(self.base, "base_model", self.base)

    @property
    def is_causal(self) -> bool:
        """Whether the base is a decoder (causal self-attention)."""
        return any(getattr(m, "is_causal", False) and hasattr(m, "layer_idx") for m in self.base.modules())

    @property
    def routing_strategy(self) -> str:
        """How LoRA rows of a mixed batch are computed: ``"gather"`` (default: each row's A/B gathered, two
        batched matmuls), ``"group"`` (one matmul pair per distinct adapter) or ``"segment"`` (rows sorted by
        adapter, grouped matmuls over the distinct adapters' weights: the GPU path for many adapters;
        inference only, training rows fall back to gather). All give the same numbers."""
        return self._route.strategy

    @routing_strategy.setter
    def routing_strategy(self, value: str) -> None:
        if value not in ROUTING_STRATEGIES:
            raise ValueError(f"routing_strategy must be one of {ROUTING_STRATEGIES}, got {value!r}")
        self._route.strategy = value

    def compact(self) -> None:
        """Release spare capacity of the stacked LoRA tensors (after adding or removing many adapters), so
        memory is the base + the adapters attached. Parameters stay the same objects (optimisers keep working)."""
        for method in self._methods.values():
            method.compact()

    def activation_checkpointing_enable(self, **checkpoint_kwargs: Any) -> None:
        """Activation (gradient) checkpointing on the base whose recomputation in backward sees the routing
        of its forward: per-row adapters, stacks and prefix keys/values, so gradients equal those without
        checkpointing. ``checkpoint_kwargs`` go to ``torch.utils.checkpoint`` (non-reentrant only: the
        routing is restored through its ``context_fn``).

        Raises:
            ValueError: ``use_reentrant=True``, or a base that does not support checkpointing.
        """
        if checkpoint_kwargs.get("use_reentrant", False) or "context_fn" in checkpoint_kwargs:
            raise ValueError(
                f"activation_checkpointing_enable takes torch.utils.checkpoint options except use_reentrant=True and "
                f"context_fn (routing is restored through a non-reentrant context_fn); got {sorted(checkpoint_kwargs)}"
            )
        kwargs = {**checkpoint_kwargs, "use_reentrant": False, "context_fn": self._route.recompute_contexts}
        base: Any = self.base  # a transformers model
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:  # older transformers name
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def set_trainable(self, name: str, trainable: bool = True) -> None:
        """Freeze (False) or unfreeze (True) every parameter of ``name``, head included."""
        for p in self.adapter_parameters(name).values():
            p.requires_grad_(trainable)

    def activate(self, name: str | tuple[str, ...] | None) -> None:
        """Use ``name`` (or the bare base for ``None``, or a stack: a tuple of names) for plain calls without
        ``adapters=``.

        O(1): one dict look-up and one assignment, whatever the number of adapters/layers. The default is
        shared by every thread; for one thread only, use :meth:`using`.

        Raises:
            TypeError: ``name`` is not a name, None or a tuple of names. KeyError: unknown adapter.
            RuntimeError: another adapter is merged into the base weights.
        """
        name = self._usable(name, "activate()")
        merged = self.merged_adapter
        sel = self._selection_of(name)
        if self._static is not None:  # compiled models: the selection is data, written in place
            device = next(self.base.parameters()).device
            sel = {
                m: self._methods[m].static_selection(
                    s, self._static.setdefault(m, StaticSlot(device)), merged is not None
                )
                for m, s in sel.items()
            }
        self._route.set_default({**sel, "name": name})

    @contextmanager
    def using(self, name: str | tuple[str, ...] | None) -> Iterator[str | tuple[str, ...] | None]:
        """Use ``name`` for this thread's plain calls inside the block (``model(**batch)``, ``generate``,
        even ``model.base(...)``); other threads and the process-wide default (:meth:`activate`) are left
        alone, and this thread's previous adapter comes back after the block. O(1) like ``activate``.

        Per thread: an asyncio task must not hold the block across an ``await`` (pass ``adapters=``). With
        :meth:`static_routing` the block takes the ordinary (int slot) path, so a compiled model may
        compile once more for it.

        Raises:
            TypeError / KeyError / RuntimeError: as :meth:`activate`.
        """
        name = self._usable(name, "using()")
        with self._route.scoped({**self._selection_of(name), "name": name}):
            yield name

    def _usable(self, name: str | tuple[str, ...] | None, where: str) -> str | tuple[str, ...] | None:
        """``name`` checked as the adapter of plain calls (a name, None or a stack; known; not hidden by a
        merged adapter), 1-tuples unwrapped."""
        problem = routing_entry_problem(name)
        if problem is not None:
            raise TypeError(
                f"{where} takes an adapter name, None (the bare base) or a tuple of names (a stack); {problem}"
            )
        name = _stack(name)
        self._check_known([name])
        merged = self.merged_adapter
        if merged is not None and name != merged:
            raise RuntimeError(
                f"adapter {merged!r} is merged into the base weights; unmerge() before using {name!r}"
            )
        return name

    def _selection_of(self, name: str | tuple[str, ...] | None) -> dict[str, object]:
        """Every method's selection for one entry on all rows (cached: what makes switching O(1))."""
        sel = self._default_selection.get(name)
        if sel is None:
            sel = self._selections([name])
            self._default_selection[name] = sel
        return sel

    def static_routing(self, enabled: bool = True) -> None:
        """Make :meth:`activate` write the active LoRA slot into a tensor instead of a Python int, so a
        ``torch.compile``d model switches adapters without recompiling (layers then compute at the largest
        rank; inference only: training falls back to the ordinary path). Stacks and prefix adapters keep
        the ordinary path."""
        self._static = {} if enabled else None
        self.activate(self.default_adapter)

    # ------------------------------------------------------------------ merging
    @property
    def merged_adapter(self) -> str | None:
        """The adapter folded into the base weights by :meth:`merge`, or None."""
        for method in self._methods.values():  # read on every routed call: one merged() per method
            merged = method.merged()
            if merged is not None:
                return merged
        return None

    def merge(self, name: str, keep_original: bool = True) -> None:
        """Fold ``name``'s weight update into the base weights (LoRA: W' = W + s·B·A; DoRA:
        W' = m/‖W + s·B·A‖·(W + s·B·A); IA3: scaled rows or columns) and activate it.

        Merging the merged adapter again is a no-op. While merged, only ``name`` (or its prefix part)
        can be used; ``unmerge()`` restores the weights (bit-exact with ``keep_original=True``).

        Raises:
            ValueError: ``name`` has no LoRA part. RuntimeError: another adapter is merged.
        """
        self._check_known([name])
        parts = [m for m in self.method_names(name) if self._methods[m].can_merge()]
        if not parts:
            raise ValueError(
                f"adapter {name!r} has no part that is a weight update to merge (methods: {self.method_names(name)})"
            )
        merged = self.merged_adapter
        if merged == name:
            return
        if merged is not None:
            raise RuntimeError(f"adapter {merged!r} is already merged; unmerge() first")
        for m in parts:
            self._methods[m].merge(name, keep_original)
        self.activate(name)

    def unmerge(self) -> None:
        """Restore the base weights after :meth:`merge`."""
        for method in self._methods.values():
            method.unmerge()

    # ------------------------------------------------------------------ calls
    @contextmanager
    def routed(
        self, adapters: str | Sequence[str | tuple[str, ...] | None] | None, batch_size: int
    ) -> Iterator[list[str | tuple[str, ...] | None]]:
        """Route every call inside the block (e.g. a custom loop calling ``model.base`` directly).

        Raises:
            ValueError / KeyError: wrong number of entries, unknown names (all listed at once).
        """
        names = self._row_names(adapters, batch_size)
        with self._route.scoped(self._selections(names)):
            yield names

    def forward(self, *args: Any, adapters: Any = _UNSET, **kwargs: Any) -> Any:
        """Run the base model with per-row adapters.

        Args:
            adapters: one entry per row, in batch order: an adapter name, ``None`` (bare base), or a
                tuple of names (a stack, e.g. ``("shared", "news")``: their LoRA updates add up, at most
                one prefix, the head of the last adapter that has one). Per-row entries come as a list;
                a single name or tuple applies to every row; omitted: the active adapter.
            *args, **kwargs: the base model's usual inputs (``input_ids``, ``attention_mask``, ...).

        Returns:
            The base model's output when no routed adapter has a head, else an :class:`AdapterOutput`.
        """
        B = _batch_size(args, kwargs)
        if adapters is _UNSET:
            # one snapshot of this thread's routing for the whole call: an activate() in another thread
            # switches later calls, not the layers of this one still to run
            with self._route.scoped({}) as call:
                name = cast("str | tuple[str, ...] | None", call["name"])
                merged = self.merged_adapter
                if merged is not None and name != merged:  # a using() block opened before a merge
                    raise RuntimeError(
                        f"adapter {merged!r} is merged into the base weights, so {name!r} cannot be used "
                        "on top of it; unmerge() first"
                    )
                return self._call([name] * B, args, kwargs)
        with self.routed(adapters, B) as names:
            return self._call(names, args, kwargs)

    def generate(self, *args: Any, adapters: Any = _UNSET, **kwargs: Any) -> Any:
        """``base.generate`` with per-row adapters (LoRA and prefix, KV cache included); ``adapters`` as in
        :meth:`forward` (omitted: this thread's active adapter, fixed for the whole generation)."""
        base: Any = self.base  # a transformers model (GenerationMixin.generate)
        if adapters is _UNSET:
            with self._route.scoped({}):
                return base.generate(*args, **kwargs)
        with self.routed(adapters, _batch_size(args, kwargs)):
            return base.generate(*args, **kwargs)

    def _call(
        self, names: list[str | tuple[str, ...] | None], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self._refuse_checkpointing(names)
        row_heads = [self._head_of(n) for n in names]
        with_head = [n for n in dict.fromkeys(row_heads) if n is not None]
        if not with_head:
            return self.base(*args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        out = self.backbone(*args, **kwargs)
        hidden = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        mask = kwargs.get("attention_mask")
        result = AdapterOutput(last_hidden_state=hidden, row_logits=[None] * len(names))
        for name in with_head:
            rows_list = [i for i, n in enumerate(row_heads) if n == name]
            rows = torch.tensor(rows_list, device=hidden.device)
            logits = self.heads[name](
                hidden.index_select(0, rows),
                mask.index_select(0, rows) if mask is not None else None,
                pooled.index_select(0, rows) if pooled is not None else None,
            )
            result.heads[name] = HeadOutput(rows=rows, logits=logits)
            for j, i in enumerate(rows_list):
                result.row_logits[i] = logits[j]
        return result

    # ------------------------------------------------------------------ internals
    def _head_of(self, entry: str | tuple[str, ...] | None) -> str | None:
        """The head a row uses: its adapter's, or for a stack the last adapter's that has one."""
        names = entry if isinstance(entry, tuple) else (entry,)
        return next((n for n in reversed(names) if n is not None and n in self.heads), None)

    def _refuse_checkpointing(self, names: list[str | tuple[str, ...] | None]) -> None:
        # Activation checkpointing recomputes layers during backward, after this call's routing has
        # ended. Enabled through activation_checkpointing_enable(), each recomputation runs under the
        # routing its forward saw; enabled on the base directly it would run other adapters, so the
        # combinations that would be wrong are refused instead of training on garbage.
        if not (self.training and torch.is_grad_enabled()):
            return
        checkpointing = getattr(self.base, "is_activation_checkpointing", None)
        if checkpointing is None:  # older transformers name
            checkpointing = getattr(self.base, "is_gradient_checkpointing", False)
        if not checkpointing or self._checkpointing_routed():
            return
        # the process default: a using() block's adapter is gone when backward recomputes
        routed = any(n != self.default_adapter for n in names)
        stateful = sorted(
            {m for n in _flat(names) for m in self.method_names(n) if not self._methods[m].recomputable}
        )
        if routed or stateful:
            raise NotImplementedError(
                "gradient checkpointing works only with the active adapter for now (activate(name), then call "
                f"without adapters=), and not with {stateful or 'per-call state'} adapters: per-call routing and "
                "per-call state are not recomputed correctly when it is enabled on the base. Enable it with "
                "model.activation_checkpointing_enable() instead (recomputation then sees each call's routing)."
            )

    def _checkpointing_routed(self) -> bool:
        """Whether the base's checkpointed layers recompute under the routing of their forward (the
        checkpoint function holds this model's ``Route.recompute_contexts``)."""
        for module in self.base.modules():
            fn = getattr(module, "_gradient_checkpointing_func", None)
            if fn is not None:
                return getattr(fn, "keywords", {}).get("context_fn") == self._route.recompute_contexts
        return False

    def _method(self, method_name: str) -> Method:
        if method_name not in self._methods:
            method = get_method(method_name)(self.base, self._route, adapter_dtype=self.lora_dtype)
            if isinstance(method.module, nn.Module):
                self.method_modules[method_name] = method.module
            self._methods[method_name] = method
            self._route.set_default({method_name: method.idle_selection})
            self._default_selection.clear()
        return self._methods[method_name]

    def _selections(self, names: Sequence[str | tuple[str, ...] | None]) -> dict[str, object]:
        return {m: method.selection(names) for m, method in self._methods.items()}

    def _make_head(self, head: HeadConfig) -> Head:
        if not isinstance(head, HeadConfig):
            raise TypeError(f"head must be an adapters_mtl.HeadConfig, got {type(head).__name__}")
        hidden = self.hidden_size
        pooling = head.pooling
        if pooling == "auto" and head.style != "linear":
            pooling = "cls"  # RoBERTa's and DistilBERT's heads read the first token, never a pooler
        elif pooling == "auto":
            backbone = self.backbone
            if getattr(backbone, "pooler", None) is not None:
                pooling = "pooler"
            else:
                pooling = "last" if self.is_causal else "cls"
        ref = next(self.base.parameters())
        return Head(head, hidden, pooling).to(device=ref.device, dtype=ref.dtype)

    def _check_known(self, names: Sequence[str | tuple[str, ...] | None]) -> None:
        unknown = sorted({n for n in _flat(names) if n not in self._configs})
        if unknown:
            raise KeyError(
                f"unknown adapter(s) {unknown}; attached adapters: {self.adapter_names or 'none'}. "
                "Add it with add_adapter(name, config) or check the spelling."
            )

    def _row_names(self, adapters: Any, batch_size: int) -> list[str | tuple[str, ...] | None]:
        if adapters is None or isinstance(adapters, (str, tuple)):  # one entry for all rows (tuple: a stack)
            problem = routing_entry_problem(adapters)
            problems = [f"adapters: {problem}"] if problem else []
            rows = [adapters] * batch_size
        elif isinstance(adapters, list):
            rows = adapters
            if len(rows) != batch_size:
                raise ValueError(
                    f"adapters has {len(rows)} entries but the batch has {batch_size} rows: pass one adapter "
                    "name (or None for the bare base model) per row, or a single name for every row."
                )
            problems = [
                f"row {i}: {p}" for i, a in enumerate(rows) if (p := routing_entry_problem(a)) is not None
            ]
        else:
            problems = [f"adapters: {routing_entry_problem(adapters)}"]
        if problems:
            raise TypeError(
                f"{'; '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}. Expected an adapter name, "
                "None, or a tuple of names (a stack, e.g. ('shared', 'news')) for every row, or a list with "
                f"one of those per row; attached adapters: {self.adapter_names or 'none'}."
            )
        names = [_stack(a) for a in rows]
        self._check_known(names)
        merged = self.merged_adapter
        if merged is not None and any(n != merged for n in names):
            raise RuntimeError(
                f"adapter {merged!r} is merged into the base weights; rows routed to {sorted({str(n) for n in names if n != merged})} "
                "would see its update too. unmerge() before routing other adapters."
            )
        return names

    def extra_repr(self) -> str:
        return (
            f"adapters={self.adapter_names}, active={self.default_adapter!r}, merged={self.merged_adapter!r}"
        )


def routing_entry_problem(entry: object, what: str = "adapter names") -> str | None:
    """What is wrong with one routing entry (None when it is a name, None, or a non-empty tuple of names;
    ``what`` names the strings in messages, e.g. "references" for the Composer).

    A list is never a stack: at the top level of ``adapters=`` a list means one entry per row, so
    accepting lists as stacks too would make ``adapters=["shared", "news"]`` silently mean two rows.
    """
    if entry is None or isinstance(entry, str):
        return None
    if isinstance(entry, tuple):
        if entry and all(isinstance(n, str) for n in entry):
            return None
        return f"got tuple {entry!r} (a stack is a non-empty tuple of {what})"
    if isinstance(entry, list):
        return f"got list {entry!r} (a stack is a tuple, not a list: {tuple(entry)!r})"
    return f"got {type(entry).__name__} {entry!r}"


def _stack(entry: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
    """Normalise a checked routing entry: a 1-element stack is just the name."""
    if isinstance(entry, tuple) and len(entry) == 1:
        return entry[0]
    return entry


def _flat(entries: Iterable[str | tuple[str, ...] | None]) -> list[str]:
    """Every adapter name in a list of routing entries (stacks flattened, None dropped)."""
    out: list[str] = []
    for e in entries:
        out.extend(e if isinstance(e, tuple) else ([e] if e is not None else []))
    return out


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    raise ValueError("cannot infer the batch size: pass input_ids or inputs_embeds")
