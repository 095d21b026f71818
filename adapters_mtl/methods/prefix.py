"""Prefix bank: per-adapter key/value prefixes, routed per row inside every self-attention layer.

PEFT injects prefixes through ``past_key_values``, which gives one prefix for the whole batch and mixes
them into the KV cache. We instead register an attention function with transformers'
``AttentionInterface`` that prepends each row's own prefix (padded to the longest prefix in the batch,
masked per row) to the keys and values, then calls transformers' SDPA attention. The KV cache holds only
real tokens, so the same path serves training, a forward pass and ``generate`` with a cache, and rows
with different prefixes (or none) share one batch. Semantics follow PEFT exactly (prefix keys are not
rotated, real-token positions start at P), so PEFT-trained prefixes behave identically here.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from typing_extensions import override

from ..core.config import hidden_size_of, text_config
from ..core.routing import Route, one_per_row, repeats
from .base import KeyMap, Method
from .prefix_config import PrefixConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["PrefixBank", "PrefixMethod", "attention_geometry"]

ATTN_IMPLEMENTATION = "adapters_mtl_sdpa"


def _register_attention() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    # module: a transformers attention module, tagged by PrefixBank with _amtl_bank and adapters_mtl_layer
    def routed_sdpa(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bank = getattr(module, "_amtl_bank", None)
        ctx = bank.current_context() if bank is not None else None
        if ctx is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        B, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
        pk, pv, pmask = ctx.layer(module.adapters_mtl_layer, B)  # (B, Hkv, P, D) x2, (B, P)
        is_causal = kwargs.pop("is_causal", None)
        if attention_mask is None:
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
            base = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
            if causal and q_len > 1:
                base = base.tril(kv_len - q_len)  # query i sees keys j <= i + (kv_len - q_len)
            base = base.view(1, 1, q_len, kv_len)
        else:
            if attention_mask.dtype != torch.bool:
                raise RuntimeError(f"prefix routing expects a boolean SDPA mask, got {attention_mask.dtype}")
            base = attention_mask[..., :kv_len]
        base = base.expand(B, 1, q_len, kv_len)
        mask = torch.cat([pmask.view(B, 1, 1, -1).expand(B, 1, q_len, pmask.shape[1]), base], dim=-1)
        key = torch.cat([pk.to(key.dtype), key], dim=2)
        value = torch.cat([pv.to(value.dtype), value], dim=2)
        return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)

    AttentionInterface.register(ATTN_IMPLEMENTATION, routed_sdpa)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _sliding_window(config: Any) -> int | None:
    """The sliding window of a config whose layers use one (None when none does)."""
    cfg = text_config(config)
    window = getattr(cfg, "sliding_window", None)
    if not isinstance(window, int) or getattr(cfg, "use_sliding_window", True) is False:
        return None
    types = getattr(cfg, "layer_types", None)
    return window if types is None or "sliding_attention" in types else None


def attention_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a transformers config, as PEFT computes them for prefixes."""
    cfg = text_config(config)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = hidden_size_of(cfg)
    if not (layers and heads and hidden):
        raise ValueError(f"cannot read layers/heads/hidden size from {type(cfg).__name__} for prefix tuning")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return layers, kv_heads, head_dim


def find_self_attention(model: PreTrainedModel, num_layers: int) -> list[nn.Module]:
    """The self-attention module of each layer, in layer order.

    Raises:
        ValueError: if the architecture does not expose one self-attention module per layer with a
            ``layer_idx`` (the transformers AttentionInterface convention), or cannot switch attention.
    """
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        cls = type(module).__name__
        if (
            isinstance(idx, int)
            and cls.endswith("Attention")
            and "Cross" not in cls
            and not getattr(module, "is_cross_attention", False)
            and hasattr(module, "config")
        ):
            found.setdefault(idx, module)
    problems = []
    if sorted(found) != list(range(num_layers)):
        problems.append(
            f"expected one self-attention module per layer (layers 0..{num_layers - 1}) using transformers' "
            f"AttentionInterface, found layers {sorted(found)}"
        )
    # transformers has no public "can this model switch attention implementation" check
    sdpa = getattr(model, "_supports_sdpa", False) and model._can_set_attn_implementation()  # noqa: SLF001
    if not sdpa:
        # e.g. Gemma 2, whose attention-logit soft-capping SDPA cannot compute
        problems.append("the model does not support SDPA attention, which routed prefixes are computed with")
    if problems:
        raise ValueError(
            f"prefix tuning is not supported on {type(model).__name__}: {'; '.join(problems)}. Supported "
            "families include BERT, RoBERTa, Llama/SmolLM2, Qwen, Mistral, Gemma 3, Phi-3, GPT-2; use LoRA for "
            "this model."
        )
    return [found[i] for i in range(num_layers)]


class _PrefixParams(nn.Module):
    """One adapter's prefix: ``embedding`` (P, L·2·H·D), or (P, H·D) plus an MLP ``transform``."""

    def __init__(
        self, P: int, kv_dim: int, layers: int, projection: bool, hidden: int | None, std: float
    ) -> None:
        super().__init__()
        out = layers * 2 * kv_dim
        self.embedding = nn.Embedding(P, kv_dim if projection else out)
        nn.init.normal_(self.embedding.weight, std=std)
        self.transform = (
            nn.Sequential(nn.Linear(kv_dim, hidden or kv_dim), nn.Tanh(), nn.Linear(hidden or kv_dim, out))
            if projection
            else None
        )

    def kv(self) -> torch.Tensor:
        """(P, L·2·H·D): per layer l, key = block 2l, value = block 2l+1 (PEFT's layout)."""
        w = self.embedding.weight
        return self.transform(w) if self.transform is not None else w


@dataclass
class PrefixContext:
    """The prefixes of one routed call.

    Attributes:
        kv: (B, P, L, 2, H, D) each row's prefix keys/values, zero-padded to the longest prefix P.
        mask: (B, P) True where the row's prefix has a token.
        lengths: (B,) each row's prefix length (real-token positions are offset by it).
    """

    kv: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor

    def layer(self, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i``'s prefix keys and values (B, H, P, D) each and the mask (B, P), for ``n`` rows."""
        if n != self.kv.shape[0]:
            raise RuntimeError(f"prefixes were built for {self.kv.shape[0]} rows but attention received {n}")
        layer = self.kv[:, :, i]  # (B, P, 2, H, D)
        return layer[:, :, 0].transpose(1, 2), layer[:, :, 1].transpose(1, 2), self.mask


class PrefixBank(nn.Module):
    """All prefix adapters of one model, plus the hooks that route them.

    Args:
        model: the wrapped transformers model (switched to the routed SDPA attention).
        route: the owning model's :class:`Route` (each call's routing is read from it per thread).
    """

    # set with object.__setattr__ (shared, not submodules): declared so that reads are typed
    _route: Route
    _model: PreTrainedModel

    def __init__(self, model: PreTrainedModel, route: Route) -> None:
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = attention_geometry(model.config)
        attn = find_self_attention(model, self.layers)
        _register_attention()
        previous = model.config._attn_implementation  # noqa: SLF001 (transformers has no public getter)
        if previous not in ("sdpa", ATTN_IMPLEMENTATION):
            import warnings

            warnings.warn(
                f"prefix tuning switches {type(model).__name__} from {previous!r} to SDPA-based routed attention "
                "(outputs are the same up to round-off; output_attentions is no longer available)",
                stacklevel=4,
            )
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        for i, module in enumerate(attn):
            object.__setattr__(module, "_amtl_bank", self)
            object.__setattr__(module, "adapters_mtl_layer", i)
        self.prefixes = nn.ModuleDict()
        # The prefixes of the backbone call in progress live in route.local (per thread), never here:
        # concurrent calls in other threads build their own.
        # (key, context) of the last no-grad call
        self._cache: tuple[tuple[Any, ...], PrefixContext | None] | None = None
        self._generation = 0  # bumped by add/remove: a re-added name never hits an old cache entry
        object.__setattr__(self, "_route", route)
        object.__setattr__(self, "_model", model)
        # The context is built once per backbone call from the current parameters (so training and a
        # plain call after activate() both see fresh values) and dropped when the call ends.
        backbone = getattr(model, "base_model", model)
        backbone.register_forward_pre_hook(self._begin_call, with_kwargs=True)
        backbone.register_forward_hook(self._end_call, always_call=True)

    @property
    def kv_dim(self) -> int:
        """Width of one layer's keys (or values): KV heads × head dim."""
        return self.kv_heads * self.head_dim

    def add(self, name: str, P: int, projection: bool, hidden: int | None, std: float) -> None:
        """Attach prefix ``name`` of ``P`` virtual tokens (``projection``: through an MLP of width
        ``hidden``), initialised normal(0, ``std``)."""
        ref = next(self._model.parameters())
        module = _PrefixParams(P, self.kv_dim, self.layers, projection, hidden, std)
        self.prefixes[name] = module.to(ref.device)
        self._generation += 1
        self._cache = None

    def remove(self, name: str) -> None:
        """Detach prefix ``name``."""
        del self.prefixes[name]
        self._generation += 1
        self._cache = None

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """Every parameter of prefix ``name``, by its name inside the prefix module."""
        return dict(self.prefixes[name].named_parameters())

    def context(
        self, names: list[str | None], device: torch.device, dtype: torch.dtype
    ) -> PrefixContext | None:
        """Build the per-row prefixes for ``names`` (one adapter name or None per row); None if no row has one."""
        uniq = sorted({n for n in names if n is not None})
        if not uniq:
            return None
        kvs = {n: cast(_PrefixParams, self.prefixes[n]).kv() for n in uniq}  # each (P_n, L*2*H*D)
        P = max(v.shape[0] for v in kvs.values())
        L, H, D = self.layers, self.kv_heads, self.head_dim
        lengths = [kvs[n].shape[0] if n is not None else 0 for n in names]
        B = len(names)
        if len(uniq) == 1 and all(n is not None for n in names):
            # one prefix for every row: a broadcast view, no per-row copy
            kv = (
                kvs[uniq[0]]
                .to(device=device, dtype=dtype)
                .view(1, P, L, 2, H, D)
                .expand(B, -1, -1, -1, -1, -1)
            )
        else:
            padded = [torch.nn.functional.pad(kvs[n], (0, 0, 0, P - kvs[n].shape[0])) for n in uniq]
            table = torch.stack([torch.zeros_like(padded[0])] + padded)  # (U+1, P, L*2*H*D), row 0 = none
            pos = {n: i + 1 for i, n in enumerate(uniq)}
            index = torch.tensor([pos[n] if n is not None else 0 for n in names], device=table.device)
            kv = table[index].to(device=device, dtype=dtype).view(B, P, L, 2, H, D)
        lengths_t = torch.tensor(lengths, device=device)
        mask = torch.arange(P, device=device).unsqueeze(0) < lengths_t.unsqueeze(1)
        return PrefixContext(kv=kv, mask=mask, lengths=lengths_t)

    def _cached_context(
        self, names: list[str | None], device: torch.device, dtype: torch.dtype
    ) -> PrefixContext | None:
        # Without autograd (inference, generate) the same rows reuse the last context: each decode
        # step of generate() would otherwise rebuild identical (B, P, L, 2, H, D) tensors. The key
        # includes every used parameter's version counter, so an in-place edit invalidates it.
        if torch.is_grad_enabled():
            self._cache = None
            return self.context(names, device, dtype)
        used = sorted({n for n in names if n is not None})
        # torch's in-place edit counter has no public name
        versions = tuple(p._version for n in used for p in self.prefixes[n].parameters())  # noqa: SLF001
        key = (tuple(names), device, dtype, self._generation, versions)
        cache = self._cache  # read once: another thread may replace it meanwhile (a tuple, swapped whole)
        if cache is None or cache[0] != key:
            cache = (key, self.context(names, device, dtype))
            self._cache = cache
        return cache[1]

    def current_context(self) -> PrefixContext | None:
        """The prefixes of this thread's backbone call in progress (None outside one, or without prefixes)."""
        return self._route.local.prefix_context

    def _begin_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        sel = self._route.get("prefix")
        local = self._route.local
        if not isinstance(sel, PrefixSelection):
            local.prefix_context = None
            return None
        # GPT-2 passes input_ids positionally (None when the caller gave inputs_embeds)
        candidates = (kwargs.get("input_ids"), args[0] if args else None, kwargs.get("inputs_embeds"))
        ref = next((t for t in candidates if t is not None), None)
        if ref is None:
            raise ValueError("prefix routing needs input_ids or inputs_embeds in the backbone call")
        B, T = ref.shape[0], ref.shape[1]
        names = sel.rows(B)
        w = next(self._model.parameters())
        ctx = self._cached_context(names, ref.device, w.dtype)
        assert ctx is not None  # a PrefixSelection routes a prefix to at least one row
        local.prefix_context = ctx
        # Real tokens sit after the prefix (positions start at P, as in PEFT); done on the backbone so
        # that generate(), which calls the base model directly, gets it too.
        off = ctx.lengths.unsqueeze(1)  # (B, 1)
        pos = kwargs.get("position_ids")
        if pos is not None:
            kwargs["position_ids"] = pos + off
            return args, kwargs
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        emb: Any = getattr(module, "embeddings", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if hasattr(emb, "create_position_ids_from_input_ids"):
            # RoBERTa/XLM-R count positions from padding_idx + 1, skipping pad tokens, and offset them by
            # the cache length: the prefix length goes there, as PEFT's past_key_values does. (From
            # inputs_embeds they ignore the cache length, so their own positions stay, as with PEFT.)
            if ids is not None:
                kwargs["position_ids"] = emb.create_position_ids_from_input_ids(
                    ids, emb.padding_idx, past + off
                )
        else:
            kwargs["position_ids"] = torch.arange(past, past + T, device=ref.device).unsqueeze(0) + off
        return args, kwargs

    def _end_call(self, _module: nn.Module, _args: object, _output: object) -> None:
        self._route.local.prefix_context = None


@dataclass(frozen=True)
class PrefixSelection:
    """Which prefix each row uses: ``uniform`` for all rows, or one name/None per row in ``names``."""

    uniform: str | None = None
    names: tuple[str | None, ...] | None = None

    def rows(self, n: int) -> list[str | None]:
        """One prefix name (or None) per row of a batch of ``n`` (a multiple of the routed rows when
        ``generate`` repeats them)."""
        if self.names is None:
            return [self.uniform] * n
        if n == len(self.names):
            return list(self.names)
        k = repeats(len(self.names), n)
        return [name for name in self.names for _ in range(k)]


class PrefixMethod(Method):
    """Prefix tuning as a method: one :class:`PrefixBank` per model. Selection: a
    :class:`PrefixSelection`, or None when no row has a prefix. Saved as PEFT's ``PrefixTuningConfig``
    with ``prompt_embeddings`` (P, L·2·H·D), the inference form (an MLP reparametrisation folded in)."""

    name = "prefix"
    config_class = PrefixConfig
    peft_config_types = ("PrefixTuningConfig",)
    idle_selection = None
    recomputable = False  # the call's keys/values are gone when backward recomputes a layer

    def __init__(self, model: nn.Module, route: Route, *, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(model, route, adapter_dtype=adapter_dtype)
        # the bank checks that the model is a transformers model whose attention it can switch
        self.bank = PrefixBank(cast("PreTrainedModel", model), route)
        self.module = self.bank  # registered by the model, so prefixes are its parameters
        self.lengths: dict[str, int] = {}

    @override
    def add(self, name: str, config: PrefixConfig) -> None:
        self.bank.add(
            name, config.num_virtual_tokens, config.projection, config.encoder_hidden_size, config.init_std
        )
        self.lengths[name] = config.num_virtual_tokens
        window = _sliding_window(self.model.config)
        if window is not None:
            warnings.warn(
                f"prefix adapter {name!r} on a model with sliding-window attention (window {window}): here the "
                "prefix stays visible to every query, while PEFT lets it slide out of the window, so outputs "
                f"differ from PEFT's for sequences longer than about {window} tokens",
                stacklevel=4,
            )

    @override
    def remove(self, name: str) -> None:
        self.bank.remove(name)
        del self.lengths[name]

    @override
    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        return {f"prefix.{k}": p for k, p in self.bank.adapter_params(name).items()}

    @override
    def selection(self, names: Sequence[str | tuple[str, ...] | None]) -> PrefixSelection | None:
        rows = one_per_row(names, self.lengths, "prefix adapters", " prefix adapter")
        if all(n is None for n in rows):
            return None
        if all(n == rows[0] for n in rows):
            return PrefixSelection(uniform=rows[0])
        return PrefixSelection(names=tuple(rows))

    @override
    def added_positions(self, config: PrefixConfig) -> int:
        return config.num_virtual_tokens

    # ---------------------------------------------------------------- files
    @override
    @classmethod
    def config_from_peft(cls, peft_config: Any, *, saved: bool = False) -> PrefixConfig:
        if saved:  # a saved folder holds the inference form: no reparametrisation to rebuild
            return PrefixConfig(num_virtual_tokens=peft_config.num_virtual_tokens, projection=False)
        return PrefixConfig.from_peft(peft_config)

    @override
    @classmethod
    def owns_peft_key(cls, key: str) -> bool:
        return key == _KEY

    @override
    @classmethod
    def check_peft_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        return [
            f"unexpected key {k!r} (a prefix adapter holds prompt_embeddings only)"
            for k in tensors
            if k != _KEY
        ]

    @override
    def peft_config(self, name: str, config: PrefixConfig, *, task_type: str, base_model: str | None) -> Any:
        layers, kv_heads, head_dim = attention_geometry(self.model.config)
        peft_cfg = config.to_peft(task_type=task_type, base_model_name_or_path=base_model)
        # the file holds the inference form (P, L·2·H·D): an MLP reparametrisation is folded in
        peft_cfg.prefix_projection = False
        peft_cfg.num_layers, peft_cfg.num_attention_heads = layers, kv_heads
        peft_cfg.token_dim = peft_cfg.encoder_hidden_size = kv_heads * head_dim
        return peft_cfg

    @override
    def check_peft_config(self, peft_config: Any) -> str | None:
        layers, kv_heads, head_dim = attention_geometry(self.model.config)
        want = (layers, kv_heads, kv_heads * head_dim)
        got = (peft_config.num_layers, peft_config.num_attention_heads, peft_config.token_dim)
        if None not in got and got != want:
            return (
                f"prefix adapter was made for (layers, KV heads, KV width) = {got} but this base model has "
                f"{want}: it belongs to another base model"
            )
        return None

    @override
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {_KEY: cast(_PrefixParams, self.bank.prefixes[name]).kv().detach().contiguous().clone()}

    @override
    @torch.no_grad()
    def load_peft_state(self, name: str, state: Mapping[str, torch.Tensor], key_maps: KeyMap) -> list[str]:
        problems = self.check_peft_tensors(state)
        if _KEY not in state:
            return [*problems, f"missing keys: [{_KEY!r}]"]
        module = cast(_PrefixParams, self.bank.prefixes[name])
        if module.transform is not None:
            return [
                *problems,
                f"{_KEY} is the projected (inference) form; add the adapter with projection=False",
            ]
        target, tensor = module.embedding.weight, state[_KEY]
        if tuple(target.shape) != tuple(tensor.shape):
            problems.append(
                f"{_KEY}: shape {tuple(tensor.shape)} but the adapter expects {tuple(target.shape)}"
            )
        if not problems:
            target.copy_(tensor.to(target.dtype))
        return problems


_KEY = "prompt_embeddings"  # PEFT's name for the saved prefix
