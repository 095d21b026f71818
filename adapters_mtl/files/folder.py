"""Adapter files: one adapter = one folder that PEFT loads as it is, plus our adapter card.

Layout of a folder:
  adapter_model.safetensors  LoRA tensors only, under PEFT's key names (what PEFT, vLLM and LoRAX read)
  adapter_config.json        PEFT's own config (written by PEFT's config class)
  head.safetensors           the task head, if any (classifier.weight / .bias, and dense.weight / .bias for
                             the two-layer RoBERTa and DistilBERT styles: see heads.Head)
  prefix/                    for a LoRA+prefix adapter: the prefix part as its own PEFT folder
  adapter_card.json          our card: task, methods, base fingerprint, head, metrics, sha256 of every file
  README.md                  the same card for people (as the Hub shows it)
A prefix-only adapter keeps its prefix at the top level. Loading never unpickles.
A PEFT SEQ_CLS / TOKEN_CLS folder also loads: the classifier PEFT saves in adapter_model.safetensors
(``modules_to_save``) becomes the adapter's head (see ``_split_peft_head``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load, save_file

from ..core.config import HeadConfig, adapter_dtype_for, validate_name
from ..core.heads import head_shapes
from ..core.model import AdapterModel
from ..core.module_paths import backbone_prefix
from ..methods import METHODS, file_order, get_method, method_for_peft_config
from .peft_format import load_parts, load_peft_state_dict, to_peft_state_dict

__all__ = [
    "AdapterFileError",
    "base_fingerprint",
    "base_id",
    "export_peft_classifier",
    "load_adapter",
    "load_peft_state_dict",
    "read_card",
    "save_adapter",
    "to_peft_state_dict",
    "check_files",
    "parse_card",
    "read_adapter",
    "read_regular",
    "safe_relpath",
    "verify_files",
]

CARD = "adapter_card.json"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
HEAD_WEIGHTS = "head.safetensors"  # the task head (heads.head_shapes names its tensors), listed in the card
# heads written before head.safetensors existed live in adapter_model.safetensors under this prefix (read
# for compatibility; vLLM and LoRAX refuse any key that is not a LoRA weight, so it is no longer written)
_HEAD_PREFIX = "adapters_mtl.head."


class AdapterFileError(ValueError):
    """An adapter folder that cannot be used: missing/edited/truncated files, pickles, wrong base or shapes."""


def base_fingerprint(model: AdapterModel, *, whole_model: bool = False) -> str:
    """A fingerprint of the frozen backbone weights, independent of which adapters are attached.

    Of the backbone only (transformers' ``base_model``: the ``BertModel`` inside a
    ``BertForSequenceClassification``, the ``GPT2Model`` inside a ``GPT2LMHeadModel``), under its own tensor
    names: task heads (classifier, ``lm_head``) and the task model's prefix are left out, so an adapter
    made on one task class of a backbone loads into another class of the same weights. A bare backbone
    (``BertModel``, the packaged MiniLM) fingerprints exactly as before this rule.
    Hashes every backbone tensor's canonical name, shape and dtype plus a strided sample of up to 1024 of
    its values (all of them for small tensors): cheap enough to run on every load, and any other
    checkpoint, architecture or precision of the base gives a different value. Cached on the model
    until a base tensor moves, changes dtype or is edited in place.

    Args:
        model: the model whose base is fingerprinted.
        whole_model: hash the whole wrapped model under its own names, heads included: the rule of
            adapters_mtl 0.1.0 cards, whose fingerprints of task-class bases (``LlamaForCausalLM``,
            ``GPT2LMHeadModel``, ``BertForSequenceClassification``) differ from the backbone's. Not cached.

    Raises:
        RuntimeError: while an adapter is merged into the base weights.
    """

    if model.merged_adapter is not None:
        raise RuntimeError(
            f"adapter {model.merged_adapter!r} is merged; unmerge() before fingerprinting the base"
        )
    # cached, keyed by where each base tensor lives and its version counter (in-place edits,
    # .to(dtype/device) and load_state_dict all change the key)
    backbone = model.base if whole_model else getattr(model.base, "base_model", model.base)
    methods = model.methods
    base_params = [
        p
        for k, p in backbone.named_parameters()
        if not p.requires_grad and not any(m.owns_parameter(k, p) for m in methods)
    ]
    # torch's in-place edit counter (no public name): edits of the base invalidate the cache
    cache_key = tuple((p.data_ptr(), p.dtype, p._version) for p in base_params)  # noqa: SLF001
    cached = getattr(model, "_base_fingerprint", None)
    if cached is not None and cached[0] == cache_key and not whole_model:
        return cached[1]
    adapter_ids = {id(p) for n in model.adapter_names for p in model.adapter_parameters(n).values()}
    h = hashlib.sha256()
    # a wrapped layer keeps the original as base_layer (one level per method wrapping it): the canonical
    # name is the unwrapped one, so the value does not depend on which methods are attached
    named = [
        (re.sub(r"(\.base_layer)+\.", ".", k), t)
        for k, t in backbone.state_dict(keep_vars=True).items()
        if id(t) not in adapter_ids
    ]
    for tensor_name, t in sorted(named, key=lambda kv: kv[0]):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].to(torch.float32).cpu().contiguous()
        h.update(f"{tensor_name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    value = "sha256:" + h.hexdigest()
    if not whole_model:
        object.__setattr__(model, "_base_fingerprint", (cache_key, value))
    return value


def _version() -> str:
    from .. import __version__  # the package's __init__ imports this module: read it late

    return __version__


def _sha256(path) -> str:

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_id(model: AdapterModel) -> str | None:
    """The name a published adapter gives its base: a Hub id, never a path on this machine.

    ``config.name_or_path`` when it is a Hub-style id (``org/name``, as ``from_pretrained(hub_id)`` and the
    packaged models set it); ``None`` when it is a local folder (the card's ``base_model_type`` and the
    fingerprint still identify the base; set ``model.config.name_or_path = "org/name"`` to name it).
    """
    name = getattr(model.config, "_name_or_path", None) or None
    if not isinstance(name, str) or _is_local_path(name):
        return None
    return name


def _is_local_path(name: str) -> bool:
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or os.path.exists(name)
    )


def _peft_config(model: AdapterModel, name: str, cfg: Any) -> Any:
    """PEFT's config object for one part of adapter ``name`` (its method adds the fields PEFT needs)."""
    task = "CAUSAL_LM" if model.is_causal else "FEATURE_EXTRACTION"
    return model.method(cfg.method).peft_config(name, cfg, task_type=task, base_model=base_id(model))


def save_adapter(
    model: AdapterModel,
    name: str,
    directory,
    *,
    task: str | None = None,
    metrics: dict | None = None,
    recipe: dict | None = None,
    description: str | None = None,
    overwrite: bool = False,
):
    """Write ``name`` as a PEFT-loadable folder with our adapter card (atomically: temp dir, then rename).

    Args:
        model: the model holding the adapter.
        name: adapter to save.
        directory: target folder (must not exist unless ``overwrite``).
        task, metrics, recipe, description: recorded in the card.

    Returns:
        The folder's ``pathlib.Path``.

    Raises:
        FileExistsError: the folder exists and ``overwrite`` is False.
    """

    target = Path(directory)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True or choose another folder")
    configs = model.adapter_config(name)
    if not configs:
        raise ValueError(
            f"adapter {name!r} is head-only (no LoRA or prefix weights): there is no adapter file PEFT could "
            "read; save the fine-tuned base model with save_pretrained instead"
        )
    head_cfg = model.head_config(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # staged beside the target (same filesystem), so the final rename is atomic
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if head_cfg is not None:  # in a file of its own: serving engines read adapter_model.safetensors
            head = {k: p.detach().contiguous().clone() for k, p in model.heads[name].named_parameters()}
            save_file(head, str(tmp / HEAD_WEIGHTS), metadata={"format": "pt", "adapters_mtl": _version()})
        # one PEFT folder per method: the first (in registration order) at the top level, where PEFT and
        # serving engines look, each other one in a sub-folder named after its method
        by_method = {c.method: c for c in configs}
        for i, method in enumerate(file_order(by_method)):
            where = tmp / method if i else tmp
            where.mkdir(exist_ok=True)
            _peft_config(model, name, by_method[method]).save_pretrained(str(where))
            state = model.method(method).peft_state(name)
            save_file(state, str(where / WEIGHTS), metadata={"format": "pt", "adapters_mtl": _version()})
        card = {
            "name": name,
            "task": task or name,
            "description": description,
            "methods": [c.method for c in configs],
            "configs": {c.method: _jsonable(c) for c in configs},
            "base_model": base_id(model),
            "base_model_type": getattr(model.config, "model_type", None),
            "base_fingerprint": base_fingerprint(model),
            "head": head_cfg.to_dict() if head_cfg is not None else None,
            "label_names": list(head_cfg.label_names)
            if head_cfg is not None and head_cfg.label_names
            else None,
            "metrics": metrics or {},
            "recipe": recipe or {},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "library": f"adapters_mtl {_version()}",
            "files": {},
        }
        for path in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != CARD):
            if path.name == "README.md":
                path.unlink()  # PEFT's template card; ours replaces it below
                continue
            card["files"][path.relative_to(tmp).as_posix()] = _sha256(path)
        (tmp / CARD).write_text(json.dumps(card, indent=2, sort_keys=True))
        (tmp / "README.md").write_text(_model_card(card))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _jsonable(cfg) -> dict:

    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "method"}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _model_card(card: dict) -> str:
    head = f"{card['head']['kind']} ({card['head']['num_labels']} labels)" if card["head"] else "none"
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {card['base_model'] or 'unknown'}",
        "tags: [adapters_mtl, " + ", ".join(card["methods"]) + "]",
        "---",
        f"# {card['name']}",
        "",
        card.get("description") or f"A {' + '.join(card['methods'])} adapter for the task `{card['task']}`.",
        "",
        f"- base model: `{card['base_model']}` (fingerprint `{card['base_fingerprint'][:23]}…`)",
        f"- head: {head}",
        f"- labels: {', '.join(card['label_names']) if card['label_names'] else '-'}",
        f"- metrics: {card['metrics'] or '-'}",
        f"- created: {card['created']} with {card['library']}",
        "",
        "Load with `adapters_mtl.files.folder.load_adapter(model, path)`, or with PEFT: "
        "`PeftModel.from_pretrained(base, path)` (the LoRA or prefix part; heads are adapters_mtl's).",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Reading a folder. Everything below is checked without a model (what `read_adapter` returns is what the
# registry's publish and verify accept), then `load_adapter` adds the checks that need the base model.
# Written by hand: PEFT reads folders it trusts (it follows symlinks, falls back to the Hub for a missing
# config and unpickles .bin files); a registry that serves other people's files cannot.

MAX_CARD_BYTES = 1 << 20  # a card is a few KiB; a bigger one is not a card
# the only kinds of files an adapter folder may list: tensors and JSON configs (never a pickle)
LISTABLE_SUFFIXES = (".safetensors", ".json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# dtypes an adapter file may store; they are converted to the model's adapter dtype on load, with a
# warning when the conversion loses precision (float64 -> float32, float32 -> bfloat16/float16)
STORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CARD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "task": (str,), "description": (str, type(None)), "methods": (list,),
    "configs": (dict,), "base_model": (str, type(None)), "base_model_type": (str, type(None)),
    "base_fingerprint": (str, type(None)), "head": (dict, type(None)),
    "label_names": (list, type(None)), "metrics": (dict,), "recipe": (dict,), "created": (str,),
    "library": (str,), "files": (dict,),
}  # fmt: skip


def safe_relpath(rel: object, where: str) -> str:
    """Check one ``files`` entry of a card: a relative POSIX path inside the folder, of a listable kind.

    Raises:
        AdapterFileError: an absolute path, ``..``, a backslash, an empty part, or a pickle / other suffix.
    """
    if not isinstance(rel, str) or not rel:
        raise AdapterFileError(f"{where}: card lists a file named {rel!r}; expected a relative path string")
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
        raise AdapterFileError(
            f"{where}: card lists {rel!r}, a path outside the folder (absolute, '..', '.' or a backslash); "
            "a card may only list files inside its own folder, e.g. 'adapter_model.safetensors'"
        )
    if rel.lower().endswith(PICKLE_SUFFIXES):
        raise AdapterFileError(
            f"{where}: card lists {rel!r}, a pickle, which adapters_mtl never reads or publishes (it can run "
            "code); convert it to safetensors"
        )
    if not rel.endswith(LISTABLE_SUFFIXES):
        raise AdapterFileError(
            f"{where}: card lists {rel!r}; an adapter folder holds only {LISTABLE_SUFFIXES} files"
        )
    return rel


def read_regular(root: Path, rel: str, limit: int | None = None) -> bytes | None:
    """Bytes of ``root/rel`` if it is a regular file reached without any symlink, else None if missing.

    Each component is opened relative to its parent's descriptor with ``O_NOFOLLOW``, and the file is
    checked on the descriptor it is read from, so swapping a file or a folder on the way for a link, a
    FIFO or a device between a check and the read cannot redirect or hang it.

    Raises:
        AdapterFileError: a symlink (of the file or of a folder on the way), a non-regular file, or a file
            over ``limit`` bytes.
    """
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    parts = rel.split("/")
    fds: list[int] = []
    path = root
    try:
        fds.append(os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)))
        for i, part in enumerate(parts):
            path = path / part
            last = i == len(parts) - 1
            flags = os.O_RDONLY | nofollow | (os.O_NONBLOCK if last else getattr(os, "O_DIRECTORY", 0))
            try:
                fds.append(os.open(part, flags, dir_fd=fds[-1]))
            except FileNotFoundError:
                return None
            except OSError as e:  # ELOOP: a link; ENOTDIR: a link or a file where a folder should be
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    raise AdapterFileError(
                        f"{path} is a symbolic link; adapter folders are read without following links (a "
                        "link can point anywhere on the machine). Copy the real file into the folder."
                    ) from e
                raise AdapterFileError(f"{path} cannot be read as part of an adapter folder ({e})") from e
        st = os.fstat(fds[-1])
        if not stat.S_ISREG(st.st_mode):
            raise AdapterFileError(f"{path} is not a regular file")
        if limit is not None and st.st_size > limit:
            raise AdapterFileError(f"{path} is {st.st_size} bytes; expected at most {limit}")
        with os.fdopen(os.dup(fds[-1]), "rb") as fh:
            data = fh.read() if limit is None else fh.read(limit + 1)
        if limit is not None and len(data) > limit:  # grew since the fstat
            raise AdapterFileError(f"{path} is over {limit} bytes")
        return data
    finally:
        for fd in fds:
            os.close(fd)


def parse_card(data: bytes, where: str) -> dict:
    """The adapter card in ``data``, checked field by field.

    Raises:
        AdapterFileError: not JSON, not an object, a field of the wrong type, a bad ``files`` entry or head.
    """
    try:
        card = json.loads(data)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a number of 4300+ digits
        raise AdapterFileError(f"{where} is not a readable adapter card ({e}); the folder is damaged") from e
    if not isinstance(card, dict):
        raise AdapterFileError(
            f"{where} holds a JSON {type(card).__name__}; an adapter card is a JSON object "
            "(as written by save_adapter); the folder is damaged"
        )
    problems = [
        f"{key!r} is {type(card[key]).__name__}, expected {' or '.join(t.__name__ for t in types)}"
        for key, types in _CARD_TYPES.items()
        if key in card and not isinstance(card[key], types)
    ]
    if "files" not in card:
        problems.append("'files' (the sha256 of every file) is missing")
    if problems:
        raise AdapterFileError(f"{where} is not a valid adapter card: " + "; ".join(problems))
    for rel, digest in card["files"].items():
        safe_relpath(rel, where)
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise AdapterFileError(f"{where}: the sha256 of {rel!r} is {digest!r}, expected 64 hex digits")
    if card.get("name") is not None:
        try:
            validate_name(card["name"])
        except ValueError as e:
            raise AdapterFileError(f"{where}: {e}") from e
    if card.get("methods") is not None and not all(isinstance(m, str) for m in card["methods"]):
        raise AdapterFileError(f"{where}: 'methods' must be a list of strings, got {card['methods']!r}")
    _head_config(card, where)
    return card


def _head_config(card: dict, where: str) -> HeadConfig | None:
    spec = card.get("head")
    if not spec:
        return None
    fields = {f.name for f in dataclasses.fields(HeadConfig)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise AdapterFileError(
            f"{where}: the card's head has unknown keys {unknown}; expected some of {sorted(fields)} "
            "(the card was edited, or written by a newer adapters_mtl)"
        )
    spec = dict(spec)
    if isinstance(spec.get("label_names"), list):
        spec["label_names"] = tuple(spec["label_names"])
    try:
        return HeadConfig(**spec)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{where}: the card's head is not valid: {e}") from e


def read_card(directory) -> dict | None:
    """The checked adapter card of a folder, or None for a plain PEFT folder (no card)."""

    root = Path(directory)
    data = read_regular(root, CARD, limit=MAX_CARD_BYTES)
    return None if data is None else parse_card(data, str(root / CARD))


def check_files(card: dict, read, present: list[str], where: str) -> dict[str, bytes]:
    """Check the files a card lists against their recorded sha256, whatever store holds them.

    Args:
        card: the adapter card (its ``files`` maps relative path -> sha256).
        read: ``read(rel) -> bytes | None`` (None: the file is missing).
        present: relative paths of the ``*.safetensors`` files in the folder (each must be listed).
        where: the folder, for messages.

    Returns:
        The verified bytes of each listed file (so callers parse exactly what was checked, read once).

    Raises:
        AdapterFileError: naming every missing, changed or unlisted file at once.
    """
    problems = []
    blobs: dict[str, bytes] = {}
    listed = card.get("files", {})
    for rel, digest in listed.items():
        data = read(safe_relpath(rel, where))
        if data is None:
            problems.append(f"{rel} is missing")
            continue
        blobs[rel] = data
        if hashlib.sha256(data).hexdigest() != digest:
            problems.append(f"{rel} does not match its recorded sha256 (edited or truncated)")
    problems += [f"{rel} is not listed in the card" for rel in present if rel not in listed]
    if problems:
        raise AdapterFileError(f"adapter folder {where} failed verification: " + "; ".join(problems))
    return blobs


def verify_files(directory, card: dict) -> dict[str, bytes]:
    """:func:`check_files` for a local folder (no symlink is followed)."""
    root = Path(directory)
    present = [p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")]
    return check_files(card, lambda rel: read_regular(root, rel), present, str(root))


@dataclasses.dataclass
class AdapterPart:
    """One PEFT folder of an adapter (the top level, or ``prefix/``): its configs and tensors."""

    folder: str  # "" (the top level) or the method's name
    peft_config: object
    config: Any  # the method's native config (``config.method`` names the method)
    tensors: dict[str, torch.Tensor]


@dataclasses.dataclass
class AdapterFolder:
    """An adapter folder read and checked without a model (see :func:`read_adapter`)."""

    root: Path
    card: dict | None
    parts: list[AdapterPart]
    head: HeadConfig | None
    head_tensors: dict[str, torch.Tensor]
    files: dict[str, bytes]  # every file read (the card included), by relative path, exactly as checked
    # the head is a PEFT classifier (modules_to_save of a SEQ_CLS/TOKEN_CLS adapter): load_adapter completes
    # it from the base model (labels, pooler, family)
    peft_head: bool = False

    @property
    def name(self) -> str | None:
        return (self.card or {}).get("name")


def _parse_peft_config(data: bytes, where: str):
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a number of 4300+ digits
        raise AdapterFileError(f"{where} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{where} holds a JSON {type(raw).__name__}; a PEFT config is a JSON object")
    try:
        return peft.PeftConfig.from_peft_type(**peft.PeftConfig.check_kwargs(**raw))
    except (
        Exception
    ) as e:  # PEFT raises several types (KeyError for an unknown peft_type, ValueError, TypeError)
        raise AdapterFileError(f"{where} is not a valid PEFT config: {type(e).__name__}: {e}") from e


def _native_config(peft_cfg: Any, where: str) -> Any:
    if getattr(peft_cfg, "modules_to_save", None) is not None:
        # a classifier PEFT saved with the adapter is read apart from the config (see _split_peft_head)
        peft_cfg = copy.copy(peft_cfg)
        peft_cfg.modules_to_save = None
    method = method_for_peft_config(peft_cfg)
    if method is None:
        known = sorted({k for m in METHODS.values() for k in m.peft_config_types})
        raise AdapterFileError(
            f"{where}: adapter type {peft_cfg.peft_type} ({type(peft_cfg).__name__}) is not supported: "
            f"expected one of {known}"
        )
    try:
        return method.config_from_peft(peft_cfg, saved=True)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{where}: {e}") from e


def _parse_tensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error type for a truncated/corrupt header
        raise AdapterFileError(
            f"{where} is not a readable safetensors file ({e}); it may be truncated"
        ) from e
    problems = []
    bad = sorted(k for k, t in tensors.items() if t.dtype not in STORED_DTYPES)
    if bad:
        problems.append(
            f"tensors {bad[:5]} have dtype {tensors[bad[0]].dtype}; adapter weights are stored as one of "
            f"{[str(d).removeprefix('torch.') for d in STORED_DTYPES]}"
        )
    nonfinite = sorted(k for k, t in tensors.items() if k not in bad and not bool(torch.isfinite(t).all()))
    if nonfinite:
        problems.append(f"tensors {nonfinite[:5]} hold NaN or Inf values (a diverged training run?)")
    if problems:
        raise AdapterFileError(f"{where}: " + "; ".join(problems))
    return tensors


# PEFT's SEQ_CLS / TOKEN_CLS adapters save the task model's classifier (``modules_to_save``) beside the
# LoRA tensors, as ``base_model.model.<module>.weight`` / ``.bias``. Each layout below is one Hugging Face
# head: (head style, pooling, {PEFT module: our Head's module}); the family is checked on load.
_PEFT_HEADS = {
    "roberta": ("roberta", "cls", {"classifier.dense": "dense", "classifier.out_proj": "classifier"}),
    "distilbert": ("distilbert", "cls", {"pre_classifier": "dense", "classifier": "classifier"}),
    "bert": ("linear", "pooler", {"classifier": "classifier"}),  # + *ForTokenClassification
    "decoder": ("linear", "last", {"score": "classifier"}),  # Llama, Mistral, Qwen, GPT-2, ...
}
_ROBERTA_HEAD_TYPES = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                       "roberta-prelayernorm")  # fmt: skip  # their heads are RobertaClassificationHead's
_PEFT_HEAD_KINDS = {"SEQ_CLS": "seq_cls", "TOKEN_CLS": "token_cls"}


def _split_peft_head(tensors: dict[str, torch.Tensor], peft_cfg, where: str):
    """Take a PEFT classifier (``modules_to_save``) out of an adapter's tensors.

    Returns:
        ``(other tensors, HeadConfig or None, head tensors under our Head's names)``. The head's label names
        and family checks need the base model: :func:`_complete_peft_head` adds them.

    Raises:
        AdapterFileError: ``modules_to_save`` tensors that are not one of the classification heads above
            (named), or a classifier in an adapter whose task is not SEQ_CLS / TOKEN_CLS.
    """
    lora_or_prefix = (
        k for k in tensors if ".lora_" in k or k == "prompt_embeddings" or k.startswith(_HEAD_PREFIX)
    )
    extra = sorted(set(tensors) - set(lora_or_prefix))
    saved = getattr(peft_cfg, "modules_to_save", None)
    if not extra or not saved:  # no classifier (stray keys are reported with the LoRA tensors)
        return tensors, None, {}
    modules: dict[str, dict[str, torch.Tensor]] = {}  # PEFT module path -> {"weight"/"bias": tensor}
    for key in extra:
        path, _, param = key.removeprefix("base_model.model.").rpartition(".")
        if not key.startswith("base_model.model.") or param not in ("weight", "bias"):
            path = key  # not a module's weight or bias: matches no layout, and is named as it is
        modules.setdefault(path, {})[param] = tensors[key]
    layout = next(
        (
            name
            for name, (_, _, names) in _PEFT_HEADS.items()
            if set(modules) == set(names) and all("weight" in modules[m] for m in names)
        ),
        None,
    )
    if layout is None:
        known = sorted({m for _, _, names in _PEFT_HEADS.values() for m in names})
        others = sorted(m for m in modules if m not in known) or sorted(modules)
        raise AdapterFileError(
            f"{where}: modules_to_save={saved!r} saved {others} (keys {extra[:6]}), which is not a "
            f"classification head adapters_mtl can run; it imports the classifier of a SEQ_CLS/TOKEN_CLS "
            "adapter (BERT-like 'classifier', RoBERTa-like 'classifier.dense/out_proj', DistilBERT's "
            "'pre_classifier' + 'classifier', a decoder's 'score'). Retrain without the other modules in "
            "modules_to_save, or serve this adapter with PEFT."
        )
    task = getattr(peft_cfg, "task_type", None)
    kind = _PEFT_HEAD_KINDS.get(task) if isinstance(task, str) else None
    style, pooling, names = _PEFT_HEADS[layout]
    if kind is None or (kind == "token_cls" and style != "linear"):
        raise AdapterFileError(
            f"{where}: holds a classifier ({sorted(modules)}) but task_type={task!r}; adapters_mtl imports "
            "the classifiers of task_type 'SEQ_CLS' and 'TOKEN_CLS' adapters"
        )
    final = modules[next(m for m, ours in names.items() if ours == "classifier")]
    if final["weight"].dim() != 2 or final["weight"].shape[0] == 0:
        raise AdapterFileError(
            f"{where}: the classifier weight has shape {tuple(final['weight'].shape)}; expected (labels, hidden)"
        )
    num_labels = int(final["weight"].shape[0])
    pooling = pooling if kind == "seq_cls" else "auto"
    head = HeadConfig(kind, num_labels, pooling, dropout=0.0, style=style, bias="bias" in final)
    ours = {f"{names[m]}.{param}": t for m, params in modules.items() for param, t in params.items()}
    return {k: v for k, v in tensors.items() if k not in extra}, head, ours


def _complete_peft_head(model: AdapterModel, head: HeadConfig, where: Path) -> HeadConfig:
    """A PEFT classifier's head on this base: its family checked, label names and dropout from the config.

    Raises:
        AdapterFileError: the base is not of the family whose head the classifier is (the logits would
            differ from PEFT's).
    """
    cfg = model.config
    model_type = getattr(cfg, "model_type", None)
    backbone = getattr(model.base, "base_model", model.base)
    problem = None
    if head.style == "roberta" and model_type not in _ROBERTA_HEAD_TYPES:
        problem = f"RoBERTa's classification head, for model types {list(_ROBERTA_HEAD_TYPES)}"
    elif head.style == "distilbert" and model_type != "distilbert":
        problem = "DistilBERT's pre_classifier + classifier, for model type 'distilbert'"
    elif head.pooling == "pooler" and getattr(backbone, "pooler", None) is None:
        problem = "a linear classifier on the pooler output (BertForSequenceClassification), but this base has no pooler"
    elif head.pooling == "last" and not model.is_causal:
        problem = "a decoder's 'score' on the last token, but this base is not a decoder"
    if problem:
        raise AdapterFileError(
            f"{where}: the adapter's classifier is {problem}; this base is model type {model_type!r}. Load "
            "it on the base model it was trained on (a bare backbone or its task model)."
        )
    # label names: the task model's id2label, unless it is transformers' default LABEL_0, LABEL_1, ...
    id2label = getattr(cfg, "id2label", None) or {}
    labels = [id2label.get(i, id2label.get(str(i))) for i in range(head.num_labels)]
    default = [f"LABEL_{i}" for i in range(head.num_labels)]
    named = all(isinstance(x, str) for x in labels) and labels != default
    # transformers treats one label (without a problem_type) as regression
    problem_type = getattr(cfg, "problem_type", None)
    regression = head.kind == "seq_cls" and (
        problem_type == "regression" or (head.num_labels == 1 and problem_type is None)
    )
    # the task model's classifier dropout (training only): BERT/RoBERTa, then DistilBERT's names
    rates = ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob")
    dropout = next(
        (d for d in (getattr(cfg, r, None) for r in rates) if isinstance(d, float) and 0 <= d < 1), 0.0
    )
    return dataclasses.replace(
        head,
        kind="regression" if regression else head.kind,
        dropout=dropout,
        label_names=tuple(labels) if named else None,
    )


def read_adapter(directory) -> AdapterFolder:
    """Read and check an adapter folder (ours or PEFT's LoRA / prefix) without touching any model.

    Checked: the card (a JSON object with typed fields, safe ``files`` paths, a valid head), every listed
    file's sha256, that no symlink is followed and no pickle is read, every PEFT config, every
    safetensors header, tensor dtypes (:data:`STORED_DTYPES`), finite values, LoRA factor pairs and ranks,
    and that head tensors match the card's head. ``load_adapter`` adds the checks against a base model.

    Raises:
        AdapterFileError: what is wrong with the folder, and what to do.
    """

    root = Path(directory)
    if not root.is_dir():
        raise AdapterFileError(
            f"{root} is not a folder: expected an adapter folder (adapter_config.json + {WEIGHTS})"
        )
    card_bytes = read_regular(root, CARD, limit=MAX_CARD_BYTES)
    card = None if card_bytes is None else parse_card(card_bytes, str(root / CARD))
    if card is not None:
        files = verify_files(root, card)
        files[CARD] = card_bytes  # the exact bytes checked: publishing copies these, never a re-read
        missing = [f for f in (CONFIG, WEIGHTS) if f not in files]
        if missing:
            raise AdapterFileError(
                f"{root / CARD} does not list {missing}; expected PEFT's files in its 'files'"
            )
    else:
        files = {}
        for rel in [
            f for m in ("", *METHODS) for f in (f"{m}/{CONFIG}".lstrip("/"), f"{m}/{WEIGHTS}".lstrip("/"))
        ]:
            data = read_regular(root, rel)
            if data is not None:
                files[rel] = data
    parts = []
    peft_heads: list[tuple[HeadConfig, dict[str, torch.Tensor]]] = []
    for sub in ("", *METHODS):
        if sub and not (
            any(rel.startswith(f"{sub}/") for rel in files) or (card is None and (root / sub).is_dir())
        ):
            continue
        where = root / sub if sub else root
        cfg_rel, weights_rel = f"{sub}/{CONFIG}".lstrip("/"), f"{sub}/{WEIGHTS}".lstrip("/")
        if weights_rel not in files:
            pickles = [p.name for p in where.glob("adapter_model.*") if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise AdapterFileError(
                    f"{where} holds {pickles[0]}, a pickle, which adapters_mtl never loads (it can run code). "
                    "Convert it once in a trusted environment: `from safetensors.torch import save_file; "
                    "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')`."
                )
            raise AdapterFileError(
                f"{where} has no {WEIGHTS}: expected a PEFT or adapters_mtl adapter folder"
            )
        if cfg_rel not in files:
            raise AdapterFileError(f"{where} has no {CONFIG}: expected a PEFT or adapters_mtl adapter folder")
        peft_cfg = _parse_peft_config(files[cfg_rel], str(root / cfg_rel))
        config = _native_config(peft_cfg, str(root / cfg_rel))
        tensors = _parse_tensors(files[weights_rel], str(root / weights_rel))
        tensors, peft_head, peft_head_tensors = _split_peft_head(tensors, peft_cfg, str(root / weights_rel))
        if peft_head is not None:
            peft_heads.append((peft_head, peft_head_tensors))
        own = {k: v for k, v in tensors.items() if not k.startswith(_HEAD_PREFIX)}
        problems = get_method(config.method).check_peft_tensors(own)
        if problems:
            raise AdapterFileError(f"{root / weights_rel}: " + "; ".join(problems[:8]))
        if sub and sub != config.method:
            raise AdapterFileError(f"{where} holds a {config.method} adapter; expected the {sub} part there")
        parts.append(AdapterPart(sub, peft_cfg, config, tensors))
    if len({p.config.method for p in parts}) != len(parts):
        raise AdapterFileError(f"{root}: two parts of the adapter hold the same method")
    head_tensors = {
        k[len(_HEAD_PREFIX) :]: v for p in parts for k, v in p.tensors.items() if k.startswith(_HEAD_PREFIX)
    }
    if HEAD_WEIGHTS in files:
        if head_tensors:
            raise AdapterFileError(f"{root} holds a head in {HEAD_WEIGHTS} and another in {WEIGHTS}")
        head_tensors = _parse_tensors(files[HEAD_WEIGHTS], str(root / HEAD_WEIGHTS))
    head = _head_config(card, str(root / CARD)) if card is not None else None
    if head is None and head_tensors:
        raise AdapterFileError(f"{root} has head tensors but no adapter card describing the head")
    if peft_heads:
        if head is not None or len(peft_heads) > 1:
            other = "the card's head" if head is not None else "a second classifier in a sub-folder"
            raise AdapterFileError(
                f"{root} holds a PEFT classifier (modules_to_save) and {other}; expected one head"
            )
        head, head_tensors = peft_heads[0]
    if head is not None:
        # the hidden size (classifier.weight's width) is checked against the base on load
        width = head_tensors.get("classifier.weight", torch.empty(0)).shape[-1:] or (0,)
        want = head_shapes(head, width[0])
        got = {k: tuple(v.shape) for k, v in head_tensors.items()}
        if want != got:
            raise AdapterFileError(
                f"{root}: head tensors {sorted(got.items())} do not match the card's head "
                f"({head.kind}, {head.num_labels} labels: {sorted(want.items())})"
            )
    return AdapterFolder(root, card, parts, head, head_tensors, files, peft_head=bool(peft_heads))


def load_adapter(model: AdapterModel, directory, name: str | None = None, *, check_base: bool = True) -> str:
    """Attach the adapter stored in ``directory`` (ours or any PEFT LoRA / prefix folder).

    A PEFT classifier adapter (task_type SEQ_CLS / TOKEN_CLS: BERT, RoBERTa/XLM-R, DistilBERT, decoders'
    ``score``) loads with its classifier as the head, on the bare backbone or on the task model, and gives
    PEFT's logits; its label names come from the base config's ``id2label`` unless they are LABEL_0, ....

    Everything is checked before anything is attached: all of :func:`read_adapter` (checksums, no
    symlink followed, no pickle read, configs, headers, dtypes, finite values), then tensor names and
    shapes against the base model and the base fingerprint (``check_base=False`` skips only that).
    Stored dtypes other than the adapter's (fp32 on a half-precision base by default, see
    ``AdapterModel(adapter_dtype=...)``) are converted, with a warning when that loses precision.
    On any error nothing stays attached.

    Returns:
        The adapter's name (``name``, else the card's name, else the folder's name).

    Raises:
        AdapterFileError: what is wrong with the folder, and what to do.
    """

    folder = read_adapter(directory)
    root, card = folder.root, folder.card
    if check_base and card is not None and card.get("base_fingerprint"):
        # cards written before fingerprints were of the backbone hold the whole model's (task classes and
        # causal LMs only: a bare backbone's value did not change)
        # (the older value is not cached: computed only when the current one does not match)
        fingerprint = card["base_fingerprint"]
        if fingerprint != base_fingerprint(model) and fingerprint != base_fingerprint(
            model, whole_model=True
        ):
            raise AdapterFileError(
                f"adapter {card.get('name')!r} was trained on base {card.get('base_model')!r} "
                f"({card['base_fingerprint'][:23]}…) but this model's base weights differ "
                f"({base_fingerprint(model)[:23]}…). Load it on its own base model, or pass check_base=False "
                "if you know the weights are equivalent (e.g. another precision)."
            )
    try:
        name = validate_name(name or folder.name or root.name)
    except ValueError as e:
        raise AdapterFileError(f"{e} (pass name= to load_adapter)") from e
    for part in folder.parts:
        problem = model.method(part.config.method).check_peft_config(part.peft_config)
        if problem is not None:
            raise AdapterFileError(f"{root / part.folder}: {problem}")
    if card is None:  # a plain PEFT folder: no fingerprint, so say what could not be proven
        made_for = getattr(folder.parts[0].peft_config, "base_model_name_or_path", None)
        here = base_id(model)
        if made_for and here and made_for != here:
            warnings.warn(
                f"{root} was made for base {made_for!r} but is loaded into {here!r}: the shapes fit, but a plain "
                "PEFT folder carries no fingerprint to prove the weights match; check its outputs",
                stacklevel=2,
            )
    states = {
        p.config.method: {k: v for k, v in p.tensors.items() if not k.startswith(_HEAD_PREFIX)}
        for p in folder.parts
    }
    base_dtype = next((p.dtype for p in model.base.parameters() if p.is_floating_point()), torch.float32)
    _warn_lossy(
        {k: v for s in states.values() for k, v in s.items()},
        model.lora_dtype or adapter_dtype_for(base_dtype),
        root,
    )
    configs = [model.method(p.config.method).loading_config(p.config) for p in folder.parts]
    head = _complete_peft_head(model, folder.head, root) if folder.peft_head else folder.head
    try:
        model.add_adapter(name, configs, head=head, trainable=False)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{root}: cannot attach the adapter to this model: {e}") from e
    try:
        load_parts(model, name, states)
        if folder.head is not None:
            own = dict(model.heads[name].named_parameters())
            if any(own[k].shape != folder.head_tensors[k].shape for k in own):
                raise AdapterFileError(
                    f"head tensors {sorted((k, tuple(v.shape)) for k, v in folder.head_tensors.items())} do not "
                    f"match this base's hidden size: {sorted((k, tuple(v.shape)) for k, v in own.items())}"
                )
            with torch.no_grad():
                for k, p in own.items():
                    p.copy_(folder.head_tensors[k].to(p.dtype))
    except Exception as e:
        model.remove_adapter(name)
        if isinstance(e, ValueError) and not isinstance(e, AdapterFileError):
            raise AdapterFileError(str(e)) from e
        raise
    return name


def _warn_lossy(tensors: dict[str, torch.Tensor], target: torch.dtype, root: Path) -> None:
    """Warn once per folder when stored weights lose precision on their way to the model's dtype."""
    order = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}
    lossy = sorted({str(t.dtype) for t in tensors.values() if order.get(t.dtype, 1) > order.get(target, 1)
                    or {t.dtype, target} == {torch.float16, torch.bfloat16}})  # fmt: skip
    if lossy:
        warnings.warn(
            f"{root}: adapter weights stored as {lossy} are converted to the model's {target}, which loses "
            "precision; load the model in the adapter's dtype to keep every bit",
            stacklevel=3,
        )


# where each head style sits in a Hugging Face task model, for export (the reverse of _PEFT_HEADS)
_EXPORT_HEADS = {
    "roberta": {"dense": "classifier.dense", "classifier": "classifier.out_proj"},
    "distilbert": {"dense": "pre_classifier", "classifier": "classifier"},
}


def export_peft_classifier(
    model: AdapterModel, name: str, directory, *, base_model: str | None = None
) -> Path:
    """Write LoRA adapter ``name`` with its head as the folder PEFT makes for ``task_type="SEQ_CLS"`` /
    ``"TOKEN_CLS"``: LoRA keys under the task model's backbone prefix (``bert.``, ``roberta.``, ``model.``)
    and the head as ``modules_to_save`` (``classifier``, ``classifier.dense/out_proj``, ``pre_classifier``,
    ``score``), so ``PeftModel.from_pretrained(<Bert|Roberta|DistilBert|Llama>For…Classification, folder)``
    and ``AutoPeftModelForSequenceClassification`` give this adapter's logits.

    Unlike :func:`save_adapter`'s folders (LoRA weights only, for serving engines), vLLM and LoRAX do not
    load these. Args: ``base_model`` names the base in ``adapter_config.json`` (default :func:`base_id`).

    Raises:
        ValueError: no head, a prefix part, or a head no Hugging Face task class has (e.g. mean pooling).
    """
    head, configs = model.head_config(name), model.adapter_config(name)
    if (
        head is None
        or not model.can_merge(name)
        or len(configs) != 1
        or head.kind not in ("seq_cls", "token_cls")
    ):
        raise ValueError(
            f"adapter {name!r} has configs {[c.method for c in configs]} and head {head}: exporting a PEFT "
            "classifier needs a LoRA-only adapter with a seq_cls or token_cls head"
        )
    (config,) = configs
    causal = model.is_causal
    if head.style in _EXPORT_HEADS:
        places = _EXPORT_HEADS[head.style]
    elif head.kind == "token_cls" or (not causal and head.pooling in ("pooler", "auto")):
        places = {"classifier": "classifier"}  # BERT-like: dropout(pooler output or tokens) -> classifier
    elif causal and head.pooling in ("last", "auto") and not head.bias:
        places = {"classifier": "score"}  # decoders: score (no bias) on the last token
    else:
        raise ValueError(
            f"adapter {name!r}'s head (style {head.style!r}, pooling {head.pooling!r}, bias {head.bias}) is not "
            "a head any Hugging Face *ForSequenceClassification model has; PEFT could not run it"
        )
    prefix, wrapped = backbone_prefix(model.base)
    outer = "base_model.model."
    tensors = {}
    for key, t in to_peft_state_dict(model, name).items():
        tail = key.removeprefix(outer)
        tensors[outer + (tail if wrapped or not prefix else f"{prefix}.{tail}")] = t
    for ours, p in model.heads[name].named_parameters():
        module, _, leaf = ours.rpartition(".")
        tensors[f"{outer}{places[module]}.{leaf}"] = p.detach().contiguous().clone()
    task = "SEQ_CLS" if head.kind == "seq_cls" else "TOKEN_CLS"
    peft_cfg = model.method(config.method).peft_config(
        name, config, task_type=task, base_model=base_model or base_id(model)
    )
    peft_cfg.modules_to_save = sorted({p.split(".")[0] for p in places.values()})
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=False)
    peft_cfg.save_pretrained(str(target))
    save_file(tensors, str(target / WEIGHTS), metadata={"format": "pt"})
    return target
