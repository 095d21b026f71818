"""Adapter and head configurations: frozen, serialisable dataclasses checked once in ``__post_init__``.

Users coming from PEFT can pass ``peft.LoraConfig`` / ``peft.PrefixTuningConfig`` anywhere a config is
taken; :func:`to_native` turns them into these classes, and ``to_peft()`` goes back, so a file written by
us carries PEFT's own ``adapter_config.json``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AdapterConfig", "HeadConfig", "LoraConfig", "PrefixConfig", "to_native", "validate_name"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


def validate_name(name: object, what: str = "adapter name") -> str:
    """Check an adapter name: 1-64 chars of letters, digits, ``_`` or ``-``, starting alphanumeric.

    Names become module keys and, later, folder names, so dots, slashes and spaces are refused.

    Raises:
        ValueError: with the received value and the expected form.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid {what} {name!r}: expected 1-64 characters of letters, digits, '_' or '-', "
            "starting with a letter or digit (no dots, slashes or spaces), e.g. 'news_topic'."
        )
    return name


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _as_tuple(value: Any) -> tuple | str | None:
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA: ``y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` on each targeted Linear/Conv1D, with ``s = alpha/r`` (or ``alpha/√r``).

    Args:
        r: rank.
        alpha: scaling numerator.
        targets: module-name suffixes (e.g. ``("q_proj", "v_proj")``), a regex matched against the full
            module name (PEFT semantics), or ``None`` for PEFT's default targets of the model type.
        dropout: dropout on the LoRA input, training only.
        use_rslora: rank-stabilised scaling ``alpha/√r``.
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``alpha`` (PEFT semantics: keys are
            matched against module names).
        init: ``"default"`` (A Kaiming-uniform, B zero: the adapter starts as identity, as in PEFT),
            ``"gaussian"`` (A normal(1/r), B zero) or ``"random"`` (A and B random: a non-identity start,
            used by tests so that merges are really exercised) or ``"zeros"`` (both zero: for weights
            that are loaded right after).
        layers_to_transform: only these layer indices (PEFT semantics).
        exclude: module names (suffixes) or a regex never to target (PEFT's ``exclude_modules``).

    ``targets="all-linear"`` targets every Linear/Conv1D but the output layer, as in PEFT.
    """

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | str | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    init: str = "default"
    layers_to_transform: tuple[int, ...] | None = None
    exclude: tuple[str, ...] | str | None = None
    method: str = field(default="lora", init=False)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            problems.append(f"r must be a positive int, got {self.r!r}")
        if not _positive_number(self.alpha):
            problems.append(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("default", "gaussian", "random", "zeros"):
            problems.append(f"init must be 'default', 'gaussian', 'random' or 'zeros', got {self.init!r}")
        for key, rank in dict(self.rank_pattern).items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                problems.append(f"rank_pattern[{key!r}] must be a positive int, got {rank!r}")
        for key, alpha in dict(self.alpha_pattern).items():
            if not _positive_number(alpha):
                problems.append(f"alpha_pattern[{key!r}] must be a positive finite number, got {alpha!r}")
        if problems:
            raise ValueError("invalid LoraConfig: " + "; ".join(problems))
        object.__setattr__(self, "targets", _as_tuple(self.targets))
        object.__setattr__(self, "layers_to_transform", _as_tuple(self.layers_to_transform))
        object.__setattr__(self, "exclude", _as_tuple(self.exclude))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))

    def scaling(self, r: int, alpha: float) -> float:
        """The LoRA scale for a module of rank ``r`` and ``alpha``."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_peft(self, target_modules: Sequence[str] | str | None = None, **extra: Any):
        """The equivalent ``peft.LoraConfig`` (``target_modules`` resolved if given)."""
        import peft

        targets = target_modules if target_modules is not None else self.targets
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            target_modules=list(targets) if isinstance(targets, tuple) else targets,
            lora_dropout=self.dropout,
            use_rslora=self.use_rslora,
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            layers_to_transform=list(self.layers_to_transform) if self.layers_to_transform else None,
            exclude_modules=list(self.exclude) if isinstance(self.exclude, tuple) else self.exclude,
            **extra,
        )

    @classmethod
    def from_peft(cls, cfg: Any) -> LoraConfig:
        """Build from a ``peft.LoraConfig``; refuses options this library does not implement."""
        unsupported = []
        if getattr(cfg, "use_dora", False):
            unsupported.append("use_dora=True")
        if getattr(cfg, "bias", "none") != "none":
            unsupported.append(f"bias={cfg.bias!r}")
        if getattr(cfg, "modules_to_save", None):
            # a saved SEQ_CLS/TOKEN_CLS folder's classifier is read by adapters_mtl.io (it becomes the head)
            unsupported.append(
                f"modules_to_save={cfg.modules_to_save!r} (train a head instead: add_adapter(..., "
                "head=HeadConfig(...)); a saved PEFT classifier folder loads with adapters_mtl.io.load_adapter)"
            )
        if getattr(cfg, "target_parameters", None):
            unsupported.append("target_parameters")
        init = cfg.init_lora_weights
        if init not in (True, False, "gaussian"):
            unsupported.append(f"init_lora_weights={init!r} (only True, False or 'gaussian')")
        for flag in (
            "lora_bias",
            "use_qalora",
            "layer_replication",
            "trainable_token_indices",
            "alora_invocation_tokens",
        ):
            if getattr(cfg, flag, None):
                unsupported.append(f"{flag}={getattr(cfg, flag)!r}")
        if unsupported:
            raise ValueError(
                "this peft.LoraConfig uses options adapters_mtl does not support: "
                + ", ".join(unsupported)
                + ". Remove them, or use PEFT for this adapter."
            )
        targets = cfg.target_modules
        if isinstance(targets, (set, list)):
            targets = tuple(sorted(targets))
        return cls(
            r=cfg.r,
            alpha=cfg.lora_alpha,
            targets=targets,
            dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora,
            rank_pattern=dict(cfg.rank_pattern or {}),
            alpha_pattern=dict(cfg.alpha_pattern or {}),
            init="random" if init is False else ("gaussian" if init == "gaussian" else "default"),
            layers_to_transform=(
                (cfg.layers_to_transform,)
                if isinstance(cfg.layers_to_transform, int)
                else _as_tuple(cfg.layers_to_transform)
            ),
            exclude=tuple(sorted(cfg.exclude_modules))
            if isinstance(cfg.exclude_modules, (set, list))
            else cfg.exclude_modules,
        )


@dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning: ``num_virtual_tokens`` learned key/value vectors prepended in every attention layer.

    Args:
        num_virtual_tokens: prefix length P.
        projection: reparametrise through a 2-layer MLP (Li & Liang 2021) while training.
        encoder_hidden_size: hidden size of that MLP (default: the model's KV width).
        init_std: std of the initial prefix values (``0`` gives a zero prefix).

    As in PEFT, positions of the real tokens start at ``P`` (the prefix occupies positions 0..P-1), so
    adapters trained with PEFT behave identically here.
    """

    num_virtual_tokens: int = 16
    projection: bool = False
    encoder_hidden_size: int | None = None
    init_std: float = 1.0
    method: str = field(default="prefix", init=False)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            problems.append(f"num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            problems.append(f"init_std must be a number >= 0, got {self.init_std!r}")
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0
        ):
            problems.append(
                f"encoder_hidden_size must be a positive int or None, got {self.encoder_hidden_size!r}"
            )
        if problems:
            raise ValueError("invalid PrefixConfig: " + "; ".join(problems))

    def to_peft(self, **extra: Any):
        """The equivalent ``peft.PrefixTuningConfig``."""
        import peft

        kw: dict[str, Any] = dict(
            num_virtual_tokens=self.num_virtual_tokens, prefix_projection=self.projection
        )
        if self.encoder_hidden_size is not None:
            kw["encoder_hidden_size"] = self.encoder_hidden_size
        return peft.PrefixTuningConfig(**kw, **extra)

    @classmethod
    def from_peft(cls, cfg: Any) -> PrefixConfig:
        """Build from a ``peft.PrefixTuningConfig``."""
        return cls(
            num_virtual_tokens=cfg.num_virtual_tokens,
            projection=bool(cfg.prefix_projection),
            encoder_hidden_size=cfg.encoder_hidden_size if cfg.prefix_projection else None,
        )


_HEAD_KINDS = ("seq_cls", "regression", "token_cls")
_POOLINGS = ("auto", "cls", "pooler", "mean", "last")
# how the pooled vector becomes logits; each reproduces a Hugging Face classification head exactly
_STYLES = ("linear", "roberta", "distilbert")


@dataclass(frozen=True)
class HeadConfig:
    """A task head carried by an adapter.

    Args:
        kind: ``"seq_cls"`` (one label per row), ``"regression"`` (``num_labels`` real values per row) or
            ``"token_cls"`` (one label per token).
        num_labels: output width.
        pooling: how a sequence becomes one vector: ``"cls"`` (first token), ``"pooler"`` (the base
            model's pooler, e.g. BERT), ``"mean"`` (mask-aware mean), ``"last"`` (last non-pad token,
            right or left padding); ``"auto"`` = pooler if the base has one, else last for decoders,
            else cls (always cls for the ``roberta`` and ``distilbert`` styles).
        dropout: dropout probability of the head (training only).
        label_names: optional names of the labels (stored with the adapter).
        style: the layers after pooling: ``"linear"`` (dropout → ``classifier``: BERT on its pooler output,
            token classification, and with ``bias=False`` a decoder's ``score``), ``"roberta"`` (dropout →
            ``dense`` (H, H) → tanh → dropout → ``classifier``: RoBERTa/XLM-R's classification head) or
            ``"distilbert"`` (``dense`` (H, H) → ReLU → dropout → ``classifier``: DistilBERT's
            ``pre_classifier``). Token classification is always ``"linear"``.
        bias: whether ``classifier`` has a bias (decoders' ``score`` layers have none).

    ``style`` and ``bias`` are left out of :meth:`to_dict` at their defaults, so the card of a plain
    linear head reads exactly as before they existed (older adapters_mtl versions still load it).
    """

    kind: str = "seq_cls"
    num_labels: int = 2
    pooling: str = "auto"
    dropout: float = 0.1
    label_names: tuple[str, ...] | None = None
    style: str = "linear"
    bias: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in _HEAD_KINDS:
            problems.append(f"kind must be one of {_HEAD_KINDS}, got {self.kind!r}")
        if not isinstance(self.num_labels, int) or self.num_labels <= 0:
            problems.append(f"num_labels must be a positive int, got {self.num_labels!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.pooling not in _POOLINGS:
            problems.append(f"pooling must be one of {_POOLINGS}, got {self.pooling!r}")
        if self.style not in _STYLES:
            problems.append(f"style must be one of {_STYLES}, got {self.style!r}")
        elif self.kind == "token_cls" and self.style != "linear":
            problems.append(f"a token_cls head is linear (one label per token), got style={self.style!r}")
        if not isinstance(self.bias, bool):
            problems.append(f"bias must be True or False, got {self.bias!r}")
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            problems.append(f"label_names has {len(self.label_names)} names but num_labels={self.num_labels}")
        if problems:
            raise ValueError("invalid HeadConfig: " + "; ".join(problems))
        object.__setattr__(self, "label_names", _as_tuple(self.label_names))

    def to_dict(self) -> dict[str, Any]:
        """The card's ``head`` entry (``style`` and ``bias`` only when not their defaults)."""
        out = dataclasses.asdict(self)
        for key in ("style", "bias"):
            if out[key] == _HEAD_DEFAULTS[key]:
                del out[key]
        return out


_HEAD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(HeadConfig)}


AdapterConfig = LoraConfig | PrefixConfig


def to_native(config: Any) -> tuple[LoraConfig | PrefixConfig, ...]:
    """Normalise one config, a PEFT config, or a list of them (LoRA + prefix) to native configs.

    Raises:
        TypeError: for anything else, naming the accepted types.
        ValueError: for two configs of the same method in one adapter.
    """
    items = list(config) if isinstance(config, (list, tuple)) else [config]
    out: list[LoraConfig | PrefixConfig] = []
    for item in items:
        if isinstance(item, (LoraConfig, PrefixConfig)):
            out.append(item)
            continue
        kind = type(item).__name__
        module = type(item).__module__
        if module.startswith("peft") and kind == "LoraConfig":
            out.append(LoraConfig.from_peft(item))
        elif module.startswith("peft") and kind == "PrefixTuningConfig":
            out.append(PrefixConfig.from_peft(item))
        else:
            raise TypeError(
                f"unsupported adapter config {kind} from {module}: expected adapters_mtl.LoraConfig, "
                "adapters_mtl.PrefixConfig, peft.LoraConfig, peft.PrefixTuningConfig, or a list of one "
                "LoRA and one prefix config."
            )
    methods = [c.method for c in out]
    if isinstance(config, (list, tuple)) and not out:
        return ()  # a head-only adapter (the model checks that it has a head)
    if not out or len(set(methods)) != len(methods):
        raise ValueError(
            f"an adapter takes one config per method (at most one LoRA and one prefix), got {methods}"
        )
    return tuple(out)
