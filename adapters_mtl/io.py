"""Adapter files: one adapter = one folder that PEFT loads as it is, plus our adapter card.

Layout of a folder:
  adapter_model.safetensors  LoRA tensors (PEFT's key names) and the head (keys under "adapters_mtl.head.")
  adapter_config.json        PEFT's own config (written by PEFT's config class)
  prefix/                    for a LoRA+prefix adapter: the prefix part as its own PEFT folder
  adapter_card.json          our card: task, methods, base fingerprint, head, metrics, sha256 of every file
  README.md                  the same card for people (as the Hub shows it)
A prefix-only adapter keeps its prefix at the top level. Loading never unpickles.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import peft
import torch
from safetensors.torch import load, load_file, save_file

from .config import HeadConfig, LoraConfig, PrefixConfig, validate_name
from .methods.prefix import attention_geometry
from .model import AdapterModel
from .peft_compat import load_peft_state_dict, to_peft_state_dict

__all__ = [
    "AdapterFileError",
    "base_fingerprint",
    "load_adapter",
    "load_peft_state_dict",
    "read_card",
    "save_adapter",
    "to_peft_state_dict",
    "check_files",
    "verify_files",
]

CARD = "adapter_card.json"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_HEAD_PREFIX = "adapters_mtl.head."


class AdapterFileError(ValueError):
    """An adapter folder that cannot be used: missing/edited/truncated files, pickles, wrong base or shapes."""


def base_fingerprint(model: AdapterModel) -> str:
    """A fingerprint of the frozen base weights, independent of which adapters are attached.

    Hashes every base tensor's canonical name, shape and dtype plus a strided sample of up to 1024 of
    its values (all of them for small tensors): cheap enough to run on every load, and any other
    checkpoint, architecture or precision of the base gives a different value. Cached on the model
    until a base tensor moves, changes dtype or is edited in place.

    Raises:
        RuntimeError: while an adapter is merged into the base weights.
    """

    if model.merged_adapter is not None:
        raise RuntimeError(
            f"adapter {model.merged_adapter!r} is merged; unmerge() before fingerprinting the base"
        )
    # cached, keyed by where each base tensor lives and its version counter (in-place edits,
    # .to(dtype/device) and load_state_dict all change the key)
    base_params = [p for k, p in model.base.named_parameters() if not p.requires_grad and ".lora_" not in k]
    cache_key = tuple((p.data_ptr(), p.dtype, p._version) for p in base_params)
    cached = getattr(model, "_base_fingerprint", None)
    if cached is not None and cached[0] == cache_key:
        return cached[1]
    adapter_ids = {id(p) for n in model.adapter_names for p in model.adapter_parameters(n).values()}
    h = hashlib.sha256()
    named = [
        (k.replace(".base_layer.", "."), t)
        for k, t in model.base.state_dict(keep_vars=True).items()
        if id(t) not in adapter_ids and ".lora_" not in k
    ]
    for tensor_name, t in sorted(named, key=lambda kv: kv[0]):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].to(torch.float32).cpu().contiguous()
        h.update(f"{tensor_name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    value = "sha256:" + h.hexdigest()
    object.__setattr__(model, "_base_fingerprint", (cache_key, value))
    return value


def _version() -> str:
    from . import __version__  # the package's __init__ imports this module: read it late

    return __version__


def _sha256(path) -> str:

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _base_id(model: AdapterModel) -> str | None:
    return getattr(model.config, "_name_or_path", None) or None


def _peft_config(model: AdapterModel, cfg, lora_targets: list[str] | None):
    """PEFT's config object for one native part, with the model-derived fields PEFT needs."""

    task = "CAUSAL_LM" if model._is_causal() else "FEATURE_EXTRACTION"
    if isinstance(cfg, LoraConfig):
        return cfg.to_peft(
            target_modules=lora_targets, task_type=task, base_model_name_or_path=_base_id(model)
        )
    layers, kv_heads, head_dim = attention_geometry(model.config)
    peft_cfg = cfg.to_peft(task_type=task, base_model_name_or_path=_base_id(model))
    # the file holds the inference form (P, L·2·H·D): an MLP reparametrisation is folded in
    peft_cfg.prefix_projection = False
    peft_cfg.num_layers, peft_cfg.num_attention_heads, peft_cfg.token_dim = (
        layers,
        kv_heads,
        kv_heads * head_dim,
    )
    peft_cfg.encoder_hidden_size = kv_heads * head_dim
    return peft_cfg


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
    tensors = to_peft_state_dict(model, name)
    head_cfg = model.head_config(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # staged beside the target (same filesystem), so the final rename is atomic
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        lora = next((c for c in configs if isinstance(c, LoraConfig)), None)
        prefix = next((c for c in configs if not isinstance(c, LoraConfig)), None)
        top = {k: v for k, v in tensors.items() if k != "prompt_embeddings"}
        if head_cfg is not None:
            for key, p in model.heads[name].named_parameters():
                top[_HEAD_PREFIX + key] = p.detach().contiguous().clone()
        if lora is not None:
            _peft_config(model, lora, None).save_pretrained(str(tmp))
            if prefix is not None:
                (tmp / "prefix").mkdir()
                _peft_config(model, prefix, None).save_pretrained(str(tmp / "prefix"))
                save_file({"prompt_embeddings": tensors["prompt_embeddings"]}, str(tmp / "prefix" / WEIGHTS))
        else:
            _peft_config(model, prefix, None).save_pretrained(str(tmp))
            top["prompt_embeddings"] = tensors["prompt_embeddings"]
        save_file(top, str(tmp / WEIGHTS), metadata={"format": "pt", "adapters_mtl": _version()})
        card = {
            "name": name,
            "task": task or name,
            "description": description,
            "methods": [c.method for c in configs],
            "configs": {c.method: _jsonable(c) for c in configs},
            "base_model": _base_id(model),
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
        "Load with `adapters_mtl.io.load_adapter(model, path)`, or with PEFT: "
        "`PeftModel.from_pretrained(base, path)` (the LoRA or prefix part; heads are adapters_mtl's).",
        "",
    ]
    return "\n".join(lines)


def read_card(directory) -> dict | None:
    """The adapter card of a folder, or None for a plain PEFT folder."""

    path = Path(directory) / CARD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path} is not a readable adapter card ({e}); the folder is damaged") from e


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
        data = read(rel)
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
    """:func:`check_files` for a local folder."""
    root = Path(directory)
    present = [p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")]
    return check_files(
        card, lambda rel: (root / rel).read_bytes() if (root / rel).is_file() else None, present, str(root)
    )


def _read_part(folder, data: bytes | None = None):
    """(PEFT config, tensors) of one PEFT folder (``data``: the weights file's verified bytes); refuses pickles."""

    folder = Path(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        if (folder / "adapter_model.bin").exists():
            raise AdapterFileError(
                f"{folder} holds adapter_model.bin, a pickle, which adapters_mtl never loads (it can run code). "
                "Convert it once in a trusted environment: `from safetensors.torch import save_file; "
                "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')`."
            )
        raise AdapterFileError(f"{folder} has no {WEIGHTS}: expected a PEFT or adapters_mtl adapter folder")
    if not (folder / CONFIG).is_file():
        raise AdapterFileError(f"{folder} has no {CONFIG}: expected a PEFT or adapters_mtl adapter folder")
    try:
        cfg = peft.PeftConfig.from_pretrained(str(folder))
    except Exception as e:  # PEFT raises several types for a bad config
        raise AdapterFileError(f"{folder / CONFIG} is not a valid PEFT config: {e}") from e
    try:
        tensors = load(data) if data is not None else load_file(str(weights))
    except Exception as e:  # safetensors raises its own error type for a truncated/corrupt header
        raise AdapterFileError(
            f"{weights} is not a readable safetensors file ({e}); it may be truncated"
        ) from e
    bad = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if bad:
        raise AdapterFileError(f"{weights}: tensors {bad[:5]} are not floating point")
    return cfg, tensors


def _native_part(model: AdapterModel, peft_cfg):

    kind = type(peft_cfg).__name__
    if kind == "LoraConfig":
        return LoraConfig.from_peft(peft_cfg)
    if kind != "PrefixTuningConfig":
        raise AdapterFileError(
            f"adapter type {peft_cfg.peft_type} is not supported: expected LORA or PREFIX_TUNING"
        )
    layers, kv_heads, head_dim = attention_geometry(model.config)
    want = (layers, kv_heads, kv_heads * head_dim)
    got = (peft_cfg.num_layers, peft_cfg.num_attention_heads, peft_cfg.token_dim)
    if None not in got and got != want:
        raise AdapterFileError(
            f"prefix adapter was made for (layers, KV heads, KV width) = {got} but this base model has {want}: "
            "it belongs to another base model"
        )
    return PrefixConfig(num_virtual_tokens=peft_cfg.num_virtual_tokens, projection=False)


def load_adapter(model: AdapterModel, directory, name: str | None = None, *, check_base: bool = True) -> str:
    """Attach the adapter stored in ``directory`` (ours or any PEFT LoRA / prefix folder).

    Everything is checked before anything is attached: file checksums (when the folder has our card),
    that no pickle is read, tensor names, shapes and dtypes against the config and the base model, and
    the base fingerprint (``check_base=False`` skips only that). On any error nothing stays attached.

    Returns:
        The adapter's name (``name``, else the card's name, else the folder's name).

    Raises:
        AdapterFileError: what is wrong with the folder, and what to do.
    """

    root = Path(directory)
    if not root.is_dir():
        raise AdapterFileError(
            f"{root} is not a folder: expected an adapter folder (adapter_config.json + {WEIGHTS})"
        )
    card = read_card(root)
    blobs: dict[str, bytes] = {}
    if card is not None:
        blobs = verify_files(root, card)
        if (
            check_base
            and card.get("base_fingerprint")
            and card["base_fingerprint"] != base_fingerprint(model)
        ):
            raise AdapterFileError(
                f"adapter {card.get('name')!r} was trained on base {card.get('base_model')!r} "
                f"({card['base_fingerprint'][:23]}…) but this model's base weights differ "
                f"({base_fingerprint(model)[:23]}…). Load it on its own base model, or pass check_base=False "
                "if you know the weights are equivalent (e.g. another precision)."
            )
    name = validate_name(name or (card or {}).get("name") or root.name)
    cfg, tensors = _read_part(root, blobs.get(WEIGHTS))
    parts = [(_native_part(model, cfg), tensors)]
    if (root / "prefix").is_dir():
        pcfg, ptensors = _read_part(root / "prefix", blobs.get(f"prefix/{WEIGHTS}"))
        parts.append((_native_part(model, pcfg), ptensors))
    head_tensors = {k[len(_HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_HEAD_PREFIX)}
    head = None
    if card is not None and card.get("head"):
        spec = dict(card["head"])
        spec["label_names"] = tuple(spec["label_names"]) if spec.get("label_names") else None
        head = HeadConfig(**spec)
    elif head_tensors:
        raise AdapterFileError(f"{root} has head tensors but no adapter card describing the head")
    merged_state: dict[str, torch.Tensor] = {}
    for _, part in parts:
        merged_state.update({k: v for k, v in part.items() if not k.startswith(_HEAD_PREFIX)})
    # values are copied in right after: skip the random initialisation
    configs = [dataclasses.replace(p, init="zeros") if isinstance(p, LoraConfig) else p for p, _ in parts]
    model.add_adapter(name, configs, head=head, trainable=False)
    try:
        load_peft_state_dict(model, name, merged_state)
        if head is not None:
            module = model.heads[name]
            own = dict(module.named_parameters())
            if set(own) != set(head_tensors) or any(own[k].shape != head_tensors[k].shape for k in own):
                raise AdapterFileError(
                    f"head tensors {sorted((k, tuple(v.shape)) for k, v in head_tensors.items())} do not match the "
                    f"card's head {sorted((k, tuple(v.shape)) for k, v in own.items())}"
                )
            with torch.no_grad():
                for k, p in own.items():
                    p.copy_(head_tensors[k].to(p.dtype))
    except Exception as e:
        model.remove_adapter(name)
        if isinstance(e, ValueError) and not isinstance(e, AdapterFileError):
            raise AdapterFileError(str(e)) from e
        raise
    return name
