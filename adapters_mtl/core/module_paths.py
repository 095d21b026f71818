"""Module paths of a transformers model as PEFT's saved key names spell them.

PEFT saves a tensor as ``base_model.model.<module path>.<name>``, with the module path of the model it
wrapped: ``bert.encoder.layer.0...`` for a ``BertForSequenceClassification``, ``encoder.layer.0...`` for
a ``BertModel``. Saving writes the paths of the model we wrap (so PEFT on the same class reads them);
loading also accepts the paths of the backbone alone or of a task model around it. Methods map their
own tensors with these; the files layer never needs to know a method's key names.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["PEFT_PREFIX", "backbone_prefix", "key_maps", "module_list"]

PEFT_PREFIX = "base_model.model."


def backbone_prefix(base: nn.Module) -> tuple[str, bool]:
    """Where a transformers model's backbone sits in task-model key names.

    Args:
        base: the wrapped model (``AdapterModel.base``).

    Returns:
        ``(prefix, wrapped)``: for a task model (``BertForSequenceClassification``, ``GPT2LMHeadModel``,
        ``LlamaForCausalLM``) the path of its backbone (``"bert"``, ``"transformer"``, ``"model"``) and
        True; for a bare backbone (``BertModel``) the prefix a task model puts it under (transformers'
        ``base_model_prefix``) and False; ``("", False)`` for a module that is not a transformers model.
    """
    inner = getattr(base, "base_model", base)
    if inner is not base:
        path = next((n for n, m in base.named_modules() if m is inner), "")
        return path, bool(path)
    return getattr(base, "base_model_prefix", "") or "", False


def module_list(root: nn.Module) -> list[nn.Module]:
    """Every module under ``root`` (itself first), depth first: ``list(root.modules())`` at about half its
    cost (an explicit stack instead of nested generators; it runs on every adapter load, to check that a
    model's modules are still the same objects), except that a module shared by two parents is listed
    at each place."""
    out: list[nn.Module] = []
    stack = [root]
    while stack:
        module = stack.pop()
        out.append(module)
        stack.extend(reversed([c for c in module._modules.values() if c is not None]))  # noqa: SLF001
    return out


def key_maps(base: nn.Module) -> list[tuple[str, Callable[[str], str | None]]]:
    """Ways to read a saved module path: as is, then with the backbone prefix added or removed.

    Returns:
        ``[(how, saved path -> this model's path or None)]``, the identity first.
    """
    prefix, wrapped = backbone_prefix(base)
    maps: list[tuple[str, Callable[[str], str | None]]] = [("as saved", lambda k: k)]
    if prefix and wrapped:  # saved on the bare backbone, loaded into the task model
        maps.append((f"with {prefix + '.'!r} added", lambda k: f"{prefix}.{k}"))
    elif prefix:  # saved on a task model, loaded into its bare backbone
        cut = prefix + "."
        maps.append((f"with {cut!r} removed", lambda k: k[len(cut) :] if k.startswith(cut) else None))
    return maps
