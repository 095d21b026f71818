"""Prompt tuning's config (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"),
PEFT's ``PromptTuningConfig`` both ways. Tokenizers are only ever read from local files."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Any

__all__ = ["PromptConfig"]

_INITS = ("random", "text", "sample_vocab")


@dataclass(frozen=True)
class PromptConfig:
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings prepended to each row's input embeddings.

    Args:
        num_virtual_tokens: how many virtual tokens (P) go before the text.
        init: ``"random"`` (N(0, 1), PEFT's RANDOM), ``"text"`` (the word embeddings of ``init_text``'s tokens,
            repeated or cut to P: PEFT's TEXT) or ``"sample_vocab"`` (random rows of the vocabulary: PEFT's
            SAMPLE_VOCAB).
        init_text: the text of ``init="text"``.
        tokenizer_name_or_path: a local tokenizer folder (or a Hub name already in the local cache) that
            tokenizes ``init_text``; it is never downloaded.
        init_token_ids: the token ids of ``init_text`` (filled from the tokenizer; pass them to skip it).
        tokenizer: (not stored) a tokenizer object to tokenize ``init_text`` with, instead of a path.

    Raises:
        ValueError: every invalid field at once (e.g. ``init="text"`` without a text, or a tokenizer that
            does not resolve locally).
    """

    num_virtual_tokens: int = 8
    init: str = "random"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    init_token_ids: tuple[int, ...] | None = None
    tokenizer: InitVar[Any] = None
    method: str = field(default="prompt", init=False)

    def __post_init__(self, tokenizer: Any) -> None:
        problems = []
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            problems.append(f"num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")
        if self.init not in _INITS:
            problems.append(f"init must be one of {list(_INITS)}, got {self.init!r}")
        ids = self.init_token_ids
        if isinstance(ids, list):
            ids = tuple(ids)
            object.__setattr__(self, "init_token_ids", ids)
        if self.init != "text":
            extra = [
                n
                for n, v in (("init_text", self.init_text), ("tokenizer", tokenizer), ("init_token_ids", ids))
                if v is not None
            ]
            if extra:
                problems.append(f"{extra} are used only with init='text' (got init={self.init!r})")
        elif not isinstance(self.init_text, str) or not self.init_text:
            problems.append(f"init='text' needs init_text (a non-empty str), got {self.init_text!r}")
        elif ids is None:
            if tokenizer is None and self.tokenizer_name_or_path is None:
                problems.append(
                    "init='text' needs a tokenizer: pass tokenizer=<a tokenizer object>, "
                    "tokenizer_name_or_path=<a local folder>, or init_token_ids"
                )
            else:
                try:
                    ids = _tokenize(self.init_text, tokenizer, self.tokenizer_name_or_path)
                    object.__setattr__(self, "init_token_ids", ids)
                except ValueError as e:
                    problems.append(str(e))
        if self.init == "text" and self.tokenizer_name_or_path is None and tokenizer is not None:
            path = getattr(tokenizer, "name_or_path", None)  # what PEFT's config records
            object.__setattr__(
                self, "tokenizer_name_or_path", path if isinstance(path, str) and path else None
            )
        if ids is not None and (
            not isinstance(ids, tuple) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids)
        ):
            problems.append(f"init_token_ids must be a non-empty sequence of ints >= 0, got {ids!r}")
        if problems:
            raise ValueError("invalid PromptConfig: " + "; ".join(problems))

    def init_ids(self) -> list[int]:
        """The P token ids of ``init="text"``: the text's ids repeated, then cut to P (PEFT's rule)."""
        ids = list(self.init_token_ids or ())
        reps = -(-self.num_virtual_tokens // len(ids))  # ceil
        return (ids * reps)[: self.num_virtual_tokens]

    def to_peft(self, **extra: Any) -> Any:
        """The equivalent ``peft.PromptTuningConfig``.

        Raises:
            ValueError: ``init="text"`` without a tokenizer path (PEFT's config requires one).
        """
        import peft

        kw: dict[str, Any] = dict(
            num_virtual_tokens=self.num_virtual_tokens, prompt_tuning_init=self.init.upper()
        )
        if self.init == "text":
            if self.tokenizer_name_or_path is None:
                raise ValueError(
                    "peft.PromptTuningConfig(prompt_tuning_init='TEXT') needs tokenizer_name_or_path, and this "
                    "PromptConfig's tokenizer object has no name_or_path: pass tokenizer_name_or_path=<folder>"
                )
            kw.update(
                prompt_tuning_init_text=self.init_text, tokenizer_name_or_path=self.tokenizer_name_or_path
            )
        return peft.PromptTuningConfig(**kw, **extra)

    @classmethod
    def from_peft(cls, cfg: Any) -> PromptConfig:
        """Build from a ``peft.PromptTuningConfig`` (TEXT init: its tokenizer is loaded from local files only).

        Raises:
            ValueError: options adapters_mtl does not support, or a tokenizer that does not resolve locally.
        """
        problems = []
        if getattr(cfg, "modules_to_save", None):
            problems.append(
                f"modules_to_save={cfg.modules_to_save!r}: train a head instead "
                "(add_adapter(..., head=HeadConfig(...)))"
            )
        if getattr(cfg, "num_transformer_submodules", None) not in (None, 1):
            problems.append(
                f"num_transformer_submodules={cfg.num_transformer_submodules} (an encoder-decoder prompt): only "
                "encoder-only and decoder-only models are supported"
            )
        if problems:
            raise ValueError("unsupported peft.PromptTuningConfig: " + "; ".join(problems))
        init = str(getattr(cfg.prompt_tuning_init, "value", cfg.prompt_tuning_init)).lower()
        if init != "text":
            return cls(num_virtual_tokens=cfg.num_virtual_tokens, init=init)
        kwargs = dict(cfg.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # as PEFT: never run a tokenizer's remote code
        ids = _tokenize(cfg.prompt_tuning_init_text, None, cfg.tokenizer_name_or_path, kwargs)
        return cls(
            num_virtual_tokens=cfg.num_virtual_tokens,
            init="text",
            init_text=cfg.prompt_tuning_init_text,
            tokenizer_name_or_path=cfg.tokenizer_name_or_path,
            init_token_ids=ids,
        )


def _tokenize(
    text: str, tokenizer: Any, path: str | None, kwargs: dict[str, Any] | None = None
) -> tuple[int, ...]:
    """``text``'s token ids (special tokens included, as PEFT) from ``tokenizer``, else from the tokenizer at
    ``path`` loaded from local files only."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **{**(kwargs or {}), "local_files_only": True})
        except (OSError, ValueError) as e:
            raise ValueError(
                f"the tokenizer {path!r} for init='text' does not resolve locally ({type(e).__name__}: {e}); "
                "adapters_mtl never downloads one: pass a local folder, or PromptConfig(tokenizer=<a tokenizer "
                "object>), or init_token_ids"
            ) from e
    if not callable(tokenizer):
        raise ValueError(f"tokenizer must be a callable tokenizer object, got {type(tokenizer).__name__}")
    ids = tokenizer(text)["input_ids"]
    return tuple(int(i) for i in ids)
