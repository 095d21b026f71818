"""Adapter files: one adapter = one folder that PEFT loads as it is, plus our adapter card.

Layout of a folder:
  adapter_model.safetensors  LoRA tensors only, under PEFT's key names (what PEFT, vLLM and LoRAX read)
  adapter_config.json        PEFT's own config (written by PEFT's config class)
  head.safetensors           the task head, if any (classifier.weight / .bias, and dense.weight / .bias for
                             the two-layer RoBERTa and DistilBERT styles: see heads.Head)
  prefix/                    for a LoRA+prefix adapter: the prefix part as its own PEFT folder
  adapters_mtl_config.json   instead of adapter_config.json for a part whose method PEFT has no format for
                             (bottleneck adapters): our config as JSON; its tensors under the method's keys
  adapter_card.json          our card: task, methods, base fingerprint, head, metrics, sha256 of every file
  README.md                  the same card for people (as the Hub shows it)
A prefix-only adapter keeps its prefix at the top level. Loading never unpickles.
A PEFT SEQ_CLS / TOKEN_CLS folder also loads: the classifier PEFT saves in adapter_model.safetensors
(``modules_to_save``) becomes the adapter's head (see ``split_peft_head``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import save_file

from ..core.config import HeadConfig, adapter_dtype_for, validate_name
from ..core.heads import head_shapes
from ..methods import METHODS, file_order, get_method, method_for_peft_config
from ..model import AdapterModel
from .card import (
    CARD,
    CONFIG,
    HEAD_PREFIX,
    HEAD_WEIGHTS,
    NATIVE_CONFIG,
    WEIGHTS,
    card_head,
    check_files,
    config_dict,
    library_version,
    parse_card,
    read_card,
    readme_for_card,
    verify_files,
)
from .fingerprint import base_fingerprint, base_id
from .peft_format import load_parts, load_peft_state_dict, to_peft_state_dict
from .peft_heads import complete_peft_head, export_peft_classifier, split_peft_head
from .safe_read import (
    MAX_CARD_BYTES,
    PICKLE_SUFFIXES,
    AdapterFileError,
    parse_tensors,
    read_regular,
    safe_relpath,
    sha256_file,
)

__all__ = [
    "AdapterFileError",
    "base_fingerprint",
    "base_id",
    "export_peft_classifier",
    "load_adapter",
    "load_peft_state_dict",
    "read_card",
    "save_adapter",
    "save_folded",
    "to_peft_state_dict",
    "check_files",
    "parse_card",
    "read_adapter",
    "read_regular",
    "safe_relpath",
    "verify_files",
]


def _peft_config(model: AdapterModel, name: str, cfg: Any) -> Any:
    """PEFT's config object for one part of adapter ``name`` (its method adds the fields PEFT needs)."""
    task = "CAUSAL_LM" if model.is_causal else "FEATURE_EXTRACTION"
    return model.method(cfg.method).peft_config(name, cfg, task_type=task, base_model=base_id(model))


def save_adapter(
    model: AdapterModel,
    name: str,
    directory: str | os.PathLike[str],
    *,
    task: str | None = None,
    metrics: dict | None = None,
    recipe: dict | None = None,
    description: str | None = None,
    overwrite: bool = False,
) -> Path:
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
            save_file(
                head, str(tmp / HEAD_WEIGHTS), metadata={"format": "pt", "adapters_mtl": library_version()}
            )
        # one PEFT folder per method: the first (in registration order) at the top level, where PEFT and
        # serving engines look, each other one in a sub-folder named after its method
        by_method = {c.method: c for c in configs}
        for i, method in enumerate(file_order(by_method)):
            where = tmp / method if i else tmp
            where.mkdir(exist_ok=True)
            if model.method(method).has_peft_format():
                _peft_config(model, name, by_method[method]).save_pretrained(str(where))
            else:  # PEFT has no format for this method: our config beside the tensors
                native = {
                    "method": method,
                    "config": config_dict(by_method[method]),
                    "library": f"adapters_mtl {library_version()}",
                }
                (where / NATIVE_CONFIG).write_text(json.dumps(native, indent=2, sort_keys=True))
            state = model.method(method).peft_state(name)
            save_file(
                state, str(where / WEIGHTS), metadata={"format": "pt", "adapters_mtl": library_version()}
            )
        card = {
            "name": name,
            "task": task or name,
            "description": description,
            "methods": [c.method for c in configs],
            "configs": {c.method: config_dict(c) for c in configs},
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
            "library": f"adapters_mtl {library_version()}",
            "files": {},
        }
        listed: dict[str, str] = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != CARD):
            if path.name == "README.md":
                path.unlink()  # PEFT's template card; ours replaces it below
                continue
            listed[path.relative_to(tmp).as_posix()] = sha256_file(path)
        card["files"] = listed
        (tmp / CARD).write_text(json.dumps(card, indent=2, sort_keys=True))
        (tmp / "README.md").write_text(readme_for_card(card))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_folded(
    model: AdapterModel,
    name: str,
    directory: str | os.PathLike[str],
    into: str | None = None,
    **save_kwargs: Any,
) -> Path:
    """Save ``name`` in the form serving uses (:meth:`AdapterModel.attach_folded`: e.g. an AdaLoRA adapter as
    a plain LoRA folder with PEFT's ``rank_pattern``) under the adapter name ``into`` (default
    ``<name>-folded``); ``save_kwargs`` as :func:`save_adapter`. Returns the folder."""
    into = model.attach_folded(name, into or f"{name}-folded")
    try:
        return save_adapter(model, into, directory, **save_kwargs)
    finally:
        model.remove_adapter(into)


@dataclasses.dataclass
class AdapterPart:
    """One PEFT folder of an adapter (the top level, or ``prefix/``): its configs and tensors."""

    folder: str  # "" (the top level) or the method's name
    peft_config: object  # None for a part in adapters_mtl's own format (a method PEFT has no format for)
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
        # a classifier PEFT saved with the adapter is read apart from the config (see split_peft_head)
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


def _parse_native_config(data: bytes, where: str) -> Any:
    """The native config of a part saved in adapters_mtl's own format (:data:`NATIVE_CONFIG`)."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise AdapterFileError(f"{where} is not valid JSON ({e})") from e
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("method"), str)
        or not isinstance(raw.get("config"), dict)
    ):
        raise AdapterFileError(
            f"{where} holds {type(raw).__name__ if not isinstance(raw, dict) else sorted(raw)}: expected a JSON "
            'object {"method": <name>, "config": {<fields>}} written by adapters_mtl'
        )
    method = METHODS.get(raw["method"])
    if method is None:
        raise AdapterFileError(
            f"{where}: adapter method {raw['method'][:80]!r} is not registered here: expected one of {sorted(METHODS)}"
        )
    try:
        return method.config_from_dict(raw["config"])
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{where}: {e}") from e


def read_adapter(directory: str | os.PathLike[str], *, require_card: bool = False) -> AdapterFolder:
    """Read and check an adapter folder (ours or PEFT's LoRA / prefix) without touching any model.

    Checked: the card (a JSON object with typed fields, safe ``files`` paths, a valid head), every listed
    file's sha256, that no symlink is followed and no pickle is read, every PEFT config, every
    safetensors header, tensor dtypes (:data:`STORED_DTYPES`), finite values, LoRA factor pairs and ranks,
    and that head tensors match the card's head. ``load_adapter`` adds the checks against a base model.
    ``require_card`` refuses a folder without an adapter card (one whose files nothing vouches for).

    Raises:
        AdapterFileError: what is wrong with the folder, and what to do.
    """

    root = Path(directory)
    if not root.is_dir():
        raise AdapterFileError(
            f"{root} is not a folder: expected an adapter folder (adapter_config.json + {WEIGHTS})"
        )
    card_bytes = read_regular(root, CARD, limit=MAX_CARD_BYTES)
    if card_bytes is None and require_card:
        raise AdapterFileError(
            f"{root} has no {CARD}: a registry version always has one (its files' sha256); the version is "
            "damaged. Publish the adapter again, or remove this version."
        )
    card = None if card_bytes is None else parse_card(card_bytes, str(root / CARD))
    if card is not None and card_bytes is not None:
        files = verify_files(root, card)
        files[CARD] = card_bytes  # the exact bytes checked: publishing copies these, never a re-read
        missing = [f for f in (CONFIG, WEIGHTS) if f not in files]
        if NATIVE_CONFIG in files and CONFIG in missing:
            missing.remove(CONFIG)
        if missing:
            raise AdapterFileError(
                f"{root / CARD} does not list {missing}; expected PEFT's files in its 'files'"
            )
    else:
        files = {}
        for rel in [f"{m}/{f}".lstrip("/") for m in ("", *METHODS) for f in (CONFIG, NATIVE_CONFIG, WEIGHTS)]:
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
        native_rel = f"{sub}/{NATIVE_CONFIG}".lstrip("/")
        if cfg_rel in files and native_rel in files:
            raise AdapterFileError(
                f"{where} holds both {CONFIG} and {NATIVE_CONFIG}; expected one config per part"
            )
        if native_rel in files:
            peft_cfg, config = None, _parse_native_config(files[native_rel], str(root / native_rel))
        elif cfg_rel in files:
            peft_cfg = _parse_peft_config(files[cfg_rel], str(root / cfg_rel))
            config = _native_config(peft_cfg, str(root / cfg_rel))
        else:
            raise AdapterFileError(f"{where} has no {CONFIG}: expected a PEFT or adapters_mtl adapter folder")
        tensors = parse_tensors(files[weights_rel], str(root / weights_rel))
        tensors, peft_head, peft_head_tensors = split_peft_head(tensors, peft_cfg, str(root / weights_rel))
        if peft_head is not None:
            peft_heads.append((peft_head, peft_head_tensors))
        own = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
        problems = get_method(config.method).check_peft_tensors(own)
        if problems:
            raise AdapterFileError(f"{root / weights_rel}: " + "; ".join(problems[:8]))
        if sub and sub != config.method:
            raise AdapterFileError(f"{where} holds a {config.method} adapter; expected the {sub} part there")
        parts.append(AdapterPart(sub, peft_cfg, config, tensors))
    if len({p.config.method for p in parts}) != len(parts):
        raise AdapterFileError(f"{root}: two parts of the adapter hold the same method")
    head_tensors = {
        k[len(HEAD_PREFIX) :]: v for p in parts for k, v in p.tensors.items() if k.startswith(HEAD_PREFIX)
    }
    if HEAD_WEIGHTS in files:
        if head_tensors:
            raise AdapterFileError(f"{root} holds a head in {HEAD_WEIGHTS} and another in {WEIGHTS}")
        head_tensors = parse_tensors(files[HEAD_WEIGHTS], str(root / HEAD_WEIGHTS))
    head = card_head(card, str(root / CARD)) if card is not None else None
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


def load_adapter(
    model: AdapterModel,
    directory: str | os.PathLike[str],
    name: str | None = None,
    *,
    check_base: bool = True,
    require_card: bool = False,
) -> str:
    """Attach the adapter stored in ``directory`` (ours or any PEFT LoRA / prefix folder).

    A PEFT classifier adapter (task_type SEQ_CLS / TOKEN_CLS: BERT, RoBERTa/XLM-R, DistilBERT, decoders'
    ``score``) loads with its classifier as the head, on the bare backbone or on the task model, and gives
    PEFT's logits; its label names come from the base config's ``id2label`` unless they are LABEL_0, ....

    Everything is checked before anything is attached: all of :func:`read_adapter` (checksums, no
    symlink followed, no pickle read, configs, headers, dtypes, finite values), then tensor names and
    shapes against the base model and the base fingerprint (``check_base=False`` skips only that).
    Stored dtypes other than the adapter's (fp32 on a half-precision base by default, see
    ``AdapterModel(adapter_dtype=...)``) are converted, with a warning when that loses precision.
    On any error nothing stays attached. ``require_card`` refuses a folder without our adapter card (a
    registry version always has one: without it, nothing proves its files are the ones published).

    Returns:
        The adapter's name (``name``, else the card's name, else the folder's name).

    Raises:
        AdapterFileError: what is wrong with the folder, and what to do.
    """

    folder = read_adapter(directory, require_card=require_card)
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
        problem = (
            model.method(part.config.method).check_peft_config(part.peft_config)
            if part.peft_config is not None
            else None
        )
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
        p.config.method: {k: v for k, v in p.tensors.items() if not k.startswith(HEAD_PREFIX)}
        for p in folder.parts
    }
    base_dtype = next((p.dtype for p in model.base.parameters() if p.is_floating_point()), torch.float32)
    _warn_lossy(
        {k: v for s in states.values() for k, v in s.items()},
        model.lora_dtype or adapter_dtype_for(base_dtype),
        root,
    )
    configs = [model.method(p.config.method).loading_config(p.config) for p in folder.parts]
    head = folder.head
    if folder.peft_head and head is not None:
        head = complete_peft_head(model, head, root)
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
    lossy = sorted(
        {
            str(t.dtype)
            for t in tensors.values()
            if order.get(t.dtype, 1) > order.get(target, 1)
            or {t.dtype, target} == {torch.float16, torch.bfloat16}
        }
    )
    if lossy:
        warnings.warn(
            f"{root}: adapter weights stored as {lossy} are converted to the model's {target}, which loses "
            "precision; load the model in the adapter's dtype to keep every bit",
            stacklevel=3,
        )
