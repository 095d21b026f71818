"""Prompt tuning as a method: per-row learned virtual tokens prepended to the input embeddings.

PEFT prepends one prompt to every row of a batch. Here a forward pre-hook on the backbone builds each
call's input embeddings itself: row ``r`` gets its own adapter's ``P_r`` virtual tokens, right-aligned in
``P = max P_r`` slots before the text (``[empty slots | virtual tokens | text]``); the empty slots are
masked out and positions are given per row, so every row computes exactly what it computes alone (rows
without a prompt included). Positions follow PEFT: virtual tokens take positions ``0..P_r-1`` and the text
starts at ``P_r``.

Output: a forward post-hook strips the ``P`` virtual slots from the backbone's output, so
``last_hidden_state`` (and ``hidden_states``), the task model's logits and the heads line up with the
caller's ``input_ids``, ``attention_mask`` and ``labels`` (PEFT returns them with the virtual positions in
front; ours equal PEFT's at the text positions). A pooler is re-read at each row's first virtual token (as
PEFT's, which pools position 0). The KV cache keeps the virtual tokens: later calls with that cache
(``generate``'s decode steps) extend the attention mask and positions for them.

Differences from PEFT: ``position_ids`` passed in (as ``generate`` does) are shifted by the row's virtual
tokens instead of dropped, so ``generate`` on left-padded rows counts positions from the first real token
(PEFT counts the padding); ``token_type_ids`` are extended with zeros on every model (PEFT drops them for
causal LMs); a causal LM's loss does not score the first label from the last virtual token (PEFT's does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from typing_extensions import override

from ..core.config import text_config
from ..core.routing import Route, one_per_row, repeats
from .base import KeyMap, Method
from .prompt_config import PromptConfig

__all__ = ["PromptBank", "PromptMethod", "PromptSelection"]

_KEY = "prompt_embeddings"  # PEFT's saved name: (P, token_dim)


@dataclass(frozen=True)
class PromptSelection:
    """Which prompt each row uses: ``uniform`` for all rows, or one name/None per row in ``names``."""

    uniform: str | None = None
    names: tuple[str | None, ...] | None = None

    def rows(self, n: int) -> list[str | None]:
        """One prompt name (or None) per row of a batch of ``n`` (a multiple of the routed rows when
        ``generate`` repeats them for beams)."""
        if self.names is None:
            return [self.uniform] * n
        if n == len(self.names):
            return list(self.names)
        k = repeats(len(self.names), n)
        return [name for name in self.names for _ in range(k)]


@dataclass
class _Call:
    """The virtual slots of one backbone call, for the post-hook.

    Attributes:
        width: P, the slots put before the text (0 on a decode step: nothing was prepended).
        gap: (B,) empty slots before each row's virtual tokens (``P - P_r``).
        uniform: every row has P virtual tokens (no empty slot).
    """

    width: int
    gap: torch.Tensor
    uniform: bool


class PromptBank(nn.Module):
    """All prompt adapters of one model (``prompts[name]``: (P, D)) and the hooks that route them.

    Args:
        model: the wrapped transformers model (its backbone gets the hooks).
        route: the owning model's :class:`Route`.
    """

    _route: Route
    _model: nn.Module

    def __init__(self, model: nn.Module, route: Route) -> None:
        super().__init__()
        get = getattr(model, "get_input_embeddings", None)
        words = get() if callable(get) else None
        if not isinstance(words, nn.Embedding):
            raise ValueError(
                f"prompt tuning needs the model's word embeddings (get_input_embeddings() returning an "
                f"nn.Embedding); {type(model).__name__} gives {type(words).__name__}: use LoRA for this model"
            )
        self.prompts = nn.ParameterDict()
        self.lengths: dict[str, int] = {}
        object.__setattr__(self, "_route", route)
        object.__setattr__(self, "_model", model)
        backbone = getattr(model, "base_model", model)
        backbone.register_forward_pre_hook(self._begin_call, with_kwargs=True)
        backbone.register_forward_hook(self._end_call, always_call=True)

    @property
    def words(self) -> nn.Embedding:
        """The base model's word embeddings (what the text's tokens go through)."""
        return cast(nn.Embedding, cast(Any, self._model).get_input_embeddings())

    def add(self, name: str, values: torch.Tensor) -> None:
        """Attach prompt ``name`` with initial ``values`` (P, D)."""
        self.prompts[name] = nn.Parameter(values.to(self.words.weight.device))
        self.lengths[name] = values.shape[0]

    def remove(self, name: str) -> None:
        """Detach prompt ``name``."""
        del self.prompts[name]
        del self.lengths[name]

    def _prompts(self, names: list[str | None], P: int) -> torch.Tensor:
        """(B, P, D): each row's virtual tokens right-aligned in P slots (zeros before, and for no prompt)."""
        used = sorted({n for n in names if n is not None})
        if len(used) == 1 and all(n is not None for n in names):
            return self.prompts[used[0]].unsqueeze(0).expand(len(names), -1, -1)  # one prompt: a view
        padded = [nn.functional.pad(self.prompts[n], (0, 0, P - self.lengths[n], 0)) for n in used]
        table = torch.stack([torch.zeros_like(padded[0]), *padded])  # (U+1, P, D); row 0: no prompt
        pos = {n: i + 1 for i, n in enumerate(used)}
        index = torch.tensor([pos[n] if n is not None else 0 for n in names], device=table.device)
        return table[index]

    def _begin_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        local: Any = self._route.local  # per-thread scratch (the core does not know this attribute)
        local.prompt_call = None  # set below once this call's inputs are rewritten
        sel = self._route.get("prompt")
        if not isinstance(sel, PromptSelection):
            return None
        kwargs = dict(kwargs)
        if args:  # GPT-2 passes input_ids positionally
            if len(args) > 1 or kwargs.get("input_ids") is not None:
                raise RuntimeError(
                    f"prompt routing expects the backbone's inputs as keywords after input_ids, got {len(args)} "
                    f"positional arguments into {type(module).__name__}"
                )
            kwargs["input_ids"], args = args[0], ()
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise ValueError("prompt routing needs input_ids or inputs_embeds in the backbone call")
        B, T, device = ref.shape[0], ref.shape[1], ref.device
        names = sel.rows(B)
        lengths = [self.lengths[n] if n is not None else 0 for n in names]
        P = max(lengths)
        uniform = min(lengths) == P
        gap = P - torch.tensor(lengths, device=device)  # (B,)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        # a cache that is not empty continues a call that already holds the virtual tokens (generate)
        prefill = past == 0
        slots = torch.arange(P, device=device)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(
                    f"prompt tuning extends a 2-D attention_mask (batch, tokens); got shape {tuple(mask.shape)}: "
                    "pass the padding mask, not a prepared 4-D mask"
                )
            vmask = (slots.unsqueeze(0) >= gap.unsqueeze(1)).to(mask.dtype)  # (B, P)
            kwargs["attention_mask"] = torch.cat([vmask, mask], dim=1)
        elif not uniform:
            seen = T if prefill else past - P + T  # the text's positions so far, this call's included
            vmask = (slots.unsqueeze(0) >= gap.unsqueeze(1)).long()
            kwargs["attention_mask"] = torch.cat([vmask, vmask.new_ones(B, seen)], dim=1)
        self._positions(module, kwargs, ids, gap, P, T, past, uniform, prefill)
        if prefill:
            types = kwargs.get("token_type_ids")
            if types is not None:  # virtual tokens are of type 0 (as PEFT)
                kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], P), types], dim=1)
            if embeds is None:
                embeds = self.words(ids)
            prompts = self._prompts(names, P).to(embeds.dtype)
            kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
            kwargs["input_ids"] = None
        local.prompt_call = _Call(width=P if prefill else 0, gap=gap, uniform=uniform)
        return args, kwargs

    def _positions(
        self,
        module: nn.Module,
        kwargs: dict[str, Any],
        ids: torch.Tensor | None,
        gap: torch.Tensor,
        P: int,
        T: int,
        past: int,
        uniform: bool,
        prefill: bool,
    ) -> None:
        """Set ``position_ids`` so that each row's positions are those it has alone: virtual token j at j,
        the text from P_r on (given positions shifted by P_r)."""
        pos = kwargs.get("position_ids")
        own = (P - gap).unsqueeze(1)  # (B, 1) each row's virtual tokens
        if pos is not None:
            pos = pos.expand(gap.shape[0], -1) if pos.dim() == 2 else pos
            if prefill:  # the virtual tokens go just before the row's first position
                virt = pos[..., :1] + (torch.arange(P, device=pos.device) - gap.unsqueeze(1)).clamp_min(0)
                kwargs["position_ids"] = torch.cat([virt, pos + own], dim=-1)
            else:
                kwargs["position_ids"] = pos + own
            return
        if uniform:
            return  # the model's own positions (0.. over the P virtual tokens, then the text): as PEFT
        emb: Any = getattr(module, "embeddings", None)
        # RoBERTa/XLM-R count positions from padding_idx + 1 (from inputs_embeds: sequentially)
        start = emb.padding_idx + 1 if hasattr(emb, "create_position_ids_from_input_ids") else 0
        if prefill:
            steps = torch.arange(P + T, device=gap.device).unsqueeze(0) - gap.unsqueeze(1)  # (B, P+T)
            new = start + steps.clamp_min(0)
            if start and ids is not None:
                # rows without a prompt keep the positions they get alone from input_ids (pads skipped)
                bare = emb.create_position_ids_from_input_ids(ids, emb.padding_idx)
                new[:, P:] = torch.where(gap.unsqueeze(1) == P, bare, new[:, P:])
            kwargs["position_ids"] = new
        else:
            kwargs["position_ids"] = start + past - gap.unsqueeze(1) + torch.arange(T, device=gap.device)

    def _end_call(self, module: nn.Module, _args: object, output: Any) -> Any:
        local: Any = self._route.local
        call: _Call | None = getattr(local, "prompt_call", None)
        local.prompt_call = None
        if call is None or not call.width or output is None:
            return None
        P = call.width
        if isinstance(output, tuple):
            return (output[0][:, P:], *output[1:])
        keys = list(output.keys())  # a transformers ModelOutput: the hidden states first
        hidden = output[keys[0]]  # (B, P+T, H)
        pooler = getattr(module, "pooler", None)
        if not call.uniform and output.get("pooler_output") is not None and callable(pooler):
            # each row pools its own first position (its first virtual token, or its text without a prompt)
            first = hidden[torch.arange(hidden.shape[0], device=hidden.device), call.gap]  # (B, H)
            output["pooler_output"] = pooler(first.unsqueeze(1))
        output[keys[0]] = hidden[:, P:]
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(h[:, P:] for h in output["hidden_states"])
        return output


class PromptMethod(Method):
    """Prompt tuning: one :class:`PromptBank` per model. Selection: a :class:`PromptSelection`, or None when
    no row has a prompt. Saved as PEFT's ``PromptTuningConfig`` with ``prompt_embeddings`` (P, D)."""

    name = "prompt"
    config_class = PromptConfig
    peft_config_types = ("PromptTuningConfig",)
    idle_selection = None
    # the prompt is part of the layers' inputs, so checkpointed layers recompute it exactly
    recomputable = True

    def __init__(self, model: nn.Module, route: Route, *, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__(model, route, adapter_dtype=adapter_dtype)
        self.bank = PromptBank(model, route)
        self.module = self.bank

    # ---------------------------------------------------------------- adapters
    @override
    def add(self, name: str, config: PromptConfig) -> None:
        words = self.bank.words
        vocab, dim = words.weight.shape
        P = config.num_virtual_tokens
        room = _max_positions(self.model.config)
        problems = []
        if room is not None and P >= room:
            problems.append(
                f"num_virtual_tokens={P} leaves no room for text in the base's {room} positions: use fewer"
            )
        w = words.weight
        dtype = self.adapter_dtype or (
            torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        )
        with torch.no_grad():
            if config.init == "text":
                ids = config.init_ids()
                bad = sorted({i for i in ids if i >= vocab})
                if bad:
                    problems.append(
                        f"init_token_ids {bad[:8]} are outside this base's vocabulary of {vocab}: the tokenizer "
                        f"{config.tokenizer_name_or_path or ''} belongs to another model"
                    )
                    values = torch.empty(0)
                else:
                    values = words(torch.tensor(ids, device=w.device)).detach().clone()
            elif config.init == "sample_vocab":
                values = words(torch.randint(0, vocab, (P,), device=w.device)).detach().clone()
            else:
                values = torch.randn(P, dim, device=w.device)
        if problems:
            raise ValueError(f"cannot add prompt adapter {name!r}: " + "; ".join(problems))
        self.bank.add(name, values.to(dtype))

    @override
    def remove(self, name: str) -> None:
        self.bank.remove(name)

    @override
    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        return {"prompt.embeddings": cast(nn.Parameter, self.bank.prompts[name])}

    @override
    def selection(self, names: Sequence[str | tuple[str, ...] | None]) -> PromptSelection | None:
        rows = one_per_row(
            names,
            self.bank.lengths,
            "prompt adapters",
            " prompt adapter (one set of virtual tokens goes before the text); stack one prompt with LoRA or "
            "other adapters",
        )
        if all(n is None for n in rows):
            return None
        if all(n == rows[0] for n in rows):
            return PromptSelection(uniform=rows[0])
        return PromptSelection(names=tuple(rows))

    @override
    def added_positions(self, config: PromptConfig) -> int:
        return config.num_virtual_tokens

    # ---------------------------------------------------------------- files
    @override
    @classmethod
    def config_from_peft(cls, peft_config: Any, *, saved: bool = False) -> PromptConfig:
        if saved:  # the file holds the values: no initialisation (and no tokenizer) needed
            PromptConfig.from_peft(_as_random(peft_config))  # the same checks of unsupported options
            return PromptConfig(num_virtual_tokens=peft_config.num_virtual_tokens)
        return PromptConfig.from_peft(peft_config)

    @override
    @classmethod
    def owns_peft_key(cls, key: str) -> bool:
        return key == _KEY

    @override
    @classmethod
    def check_peft_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> list[str]:
        problems = [
            f"unexpected key {k!r} (a prompt adapter holds {_KEY} only)" for k in tensors if k != _KEY
        ]
        t = tensors.get(_KEY)
        if t is not None and t.dim() != 2:
            problems.append(f"{_KEY} has shape {tuple(t.shape)}; expected (num_virtual_tokens, token_dim)")
        return problems

    @override
    def peft_config(self, name: str, config: PromptConfig, *, task_type: str, base_model: str | None) -> Any:
        # the file holds the values: RANDOM, so that PEFT loads it without looking for a tokenizer
        peft_cfg = PromptConfig(num_virtual_tokens=config.num_virtual_tokens).to_peft(
            task_type=task_type, base_model_name_or_path=base_model
        )
        peft_cfg.token_dim = self.bank.words.weight.shape[1]
        peft_cfg.num_transformer_submodules = 1
        return peft_cfg

    @override
    def check_peft_config(self, peft_config: Any) -> str | None:
        dim = self.bank.words.weight.shape[1]
        got = getattr(peft_config, "token_dim", None)
        if got is not None and got != dim:
            return (
                f"prompt adapter was made for token_dim={got} but this base model's word embeddings are {dim} "
                "wide: it belongs to another base model"
            )
        return None

    @override
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        return {_KEY: self.bank.prompts[name].detach().contiguous().clone()}

    @override
    @torch.no_grad()
    def load_peft_state(self, name: str, state: Mapping[str, torch.Tensor], key_maps: KeyMap) -> list[str]:
        problems = self.check_peft_tensors(state)
        if _KEY not in state:
            return [*problems, f"missing keys: [{_KEY!r}]"]
        target, tensor = self.bank.prompts[name], state[_KEY]
        if tuple(target.shape) != tuple(tensor.shape):
            problems.append(
                f"{_KEY}: shape {tuple(tensor.shape)} but the adapter expects {tuple(target.shape)}"
            )
        if not problems:
            target.copy_(tensor.to(target.dtype))
        return problems


def _as_random(peft_config: Any) -> Any:
    """A copy of a PEFT prompt config with RANDOM init (to check its other options without a tokenizer)."""
    import copy

    out = copy.copy(peft_config)
    out.prompt_tuning_init = "RANDOM"
    return out


def _max_positions(config: Any) -> int | None:
    """The number of positions a base with learned position embeddings has (None: not fixed or unknown)."""
    cfg = text_config(config)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return n if isinstance(n, int) else None
