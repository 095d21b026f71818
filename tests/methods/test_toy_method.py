"""A third adapter method defined in this file alone runs through the whole package unchanged.

The toy method scales each targeted Linear's output by a learned vector per adapter (y = (x·Wᵀ + b)·l,
per row), which is exactly PEFT's IA3 on non-feed-forward modules, so it saves as PEFT's ``IA3Config``
and PEFT reads it. Nothing in ``adapters_mtl`` names it: this is the proof that the method protocol
(``adapters_mtl.methods.Method``) is complete: routed == alone, stacks with LoRA, save/load bit-exact,
PEFT reads what we write, registry publish/load, ``Composer.use``, a clear refusal to merge.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field

import peft
import pytest
import torch
from helpers import LORA_TARGETS, batch, tiny
from torch import nn
from typing_extensions import override

from adapters_mtl import AdapterModel, LoraConfig
from adapters_mtl.core.module_paths import PEFT_PREFIX
from adapters_mtl.files.folder import load_adapter, save_adapter
from adapters_mtl.methods import Method, get_method, register_method, unregister_method
from adapters_mtl.registry import AdapterRegistry
from adapters_mtl.serving.composer import Composer


@dataclass(frozen=True)
class ScaleConfig:
    targets: tuple[str, ...] = ("query", "value")
    init_std: float = 0.0  # 0: identity (all ones)
    method: str = field(default="scale", init=False)

    def to_peft(self, **extra):
        return peft.IA3Config(target_modules=list(self.targets), feedforward_modules=[], **extra)

    @classmethod
    def from_peft(cls, cfg) -> ScaleConfig:
        if cfg.feedforward_modules:
            raise ValueError("the toy method scales outputs only (no feedforward_modules)")
        return cls(targets=tuple(sorted(cfg.target_modules)))


class ScaleLayer(nn.Module):
    """Wraps one Linear; multiplies its output by each row's adapter vector (slot 0 = ones)."""

    def __init__(self, base_layer: nn.Linear, route) -> None:
        super().__init__()
        self.base_layer, self.vectors, self.slots = base_layer, nn.ParameterDict(), {}
        linear = next(m for m in base_layer.modules() if isinstance(m, nn.Linear))  # under other wrappers
        self.out_features = linear.out_features
        object.__setattr__(self, "route", route)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        sel = self.route.get("scale")
        for level in sel if isinstance(sel, tuple) else (sel,):  # a stack multiplies its levels
            if isinstance(level, int):
                name = self.slots.get(level)
                y = y * self.vectors[name] if name is not None else y
            else:  # one slot per row
                ones = y.new_ones(self.out_features)
                table = torch.stack([self.vectors[self.slots[s]] if s in self.slots else ones for s in level])
                y = y * table.unsqueeze(1)
        return y


class ScaleMethod(Method):
    name = "scale"
    config_class = ScaleConfig
    peft_config_types = ("IA3Config",)
    idle_selection = 0

    def __init__(self, model, route, *, adapter_dtype=None) -> None:
        super().__init__(model, route, adapter_dtype=adapter_dtype)
        self.layers: dict[str, ScaleLayer] = {}
        self.slot: dict[str, int] = {}
        self.paths: dict[str, list[str]] = {}

    @override
    def add(self, name, config) -> None:
        # a Linear another method wrapped (kept as its base_layer) is named by the wrapper's path; the toy
        # wraps the outermost module there, so its scaling always applies to the whole layer output
        paths = {
            re.sub(r"(\.base_layer)+$", "", p)
            for p, m in self.model.named_modules()
            if isinstance(m, nn.Linear)
        }
        paths = sorted(p for p in paths if p.rsplit(".", 1)[-1] in config.targets)
        if not paths:
            raise ValueError(f"scale targets {config.targets} match no Linear")
        slot = max(self.slot.values(), default=0) + 1
        for path in paths:
            if path not in self.layers:
                parent, _, child = path.rpartition(".")
                owner = self.model.get_submodule(parent)
                self.layers[path] = ScaleLayer(getattr(owner, child), self.route)
                setattr(owner, child, self.layers[path])
            layer = self.layers[path]
            vec = 1 + config.init_std * torch.randn(layer.out_features)
            layer.vectors[name] = nn.Parameter(vec.to(next(layer.base_layer.parameters())))
            layer.slots[slot] = name
        self.slot[name], self.paths[name] = slot, paths

    @override
    def remove(self, name) -> None:
        slot = self.slot.pop(name)
        for path in self.paths.pop(name):
            del self.layers[path].vectors[name]
            del self.layers[path].slots[slot]

    @override
    def adapter_params(self, name):
        return {f"{p}.scale_vector": self.layers[p].vectors[name] for p in self.paths[name]}

    @override
    def selection(self, names):
        stacks = [[n for n in (e if isinstance(e, tuple) else (e,)) if n in self.slot] for e in names]
        depth = max((len(s) for s in stacks), default=0)
        levels = [[self.slot[s[k]] if k < len(s) else 0 for s in stacks] for k in range(depth)]
        levels = [lv[0] if len(set(lv)) == 1 else lv for lv in levels]
        return 0 if not levels else (levels[0] if depth == 1 else tuple(levels))

    @override
    def owns_parameter(self, qualified_name, parameter) -> bool:
        return ".vectors." in qualified_name

    @override
    @classmethod
    def owns_peft_key(cls, key) -> bool:
        return key.endswith(".ia3_l")

    @override
    @classmethod
    def check_peft_tensors(cls, tensors):
        return [
            f"{k}: expected <module>.ia3_l of shape (out, 1)"
            for k, t in tensors.items()
            if not k.endswith(".ia3_l") or t.dim() != 2 or t.shape[1] != 1
        ]

    @override
    def peft_state(self, name):
        return {
            f"{PEFT_PREFIX}{p}.ia3_l": self.layers[p].vectors[name].detach().reshape(-1, 1).clone()
            for p in self.paths[name]
        }

    @override
    @torch.no_grad()
    def load_peft_state(self, name, state, key_maps):
        mine = {p: self.layers[p].vectors[name] for p in self.paths[name]}
        for _, path_of in key_maps:
            paths = {k: path_of(k.removeprefix(PEFT_PREFIX).removesuffix(".ia3_l")) for k in state}
            if set(paths.values()) == set(mine):
                for key, path in paths.items():
                    mine[path].copy_(state[key].reshape(-1))
                return []
        return [f"saved modules {sorted(state)} do not match this adapter's {sorted(mine)}"]


@pytest.fixture
def scale_method():
    # the toy saves in PEFT's IA3 form, which the package's own IA3 method reads: one PEFT type maps to one
    # method, so IA3 steps aside while the toy is registered
    ia3 = get_method("ia3")
    unregister_method("ia3")
    register_method(ScaleMethod)
    yield ScaleMethod
    unregister_method("scale")
    register_method(ia3)


def _model() -> AdapterModel:
    model = AdapterModel(tiny("bert"))
    torch.manual_seed(7)
    model.add_adapter("s1", ScaleConfig(init_std=0.5))
    model.add_adapter("s2", ScaleConfig(targets=("query", "key", "dense"), init_std=0.5))
    model.add_adapter("lora", LoraConfig(r=4, targets=LORA_TARGETS["bert"], init="random"))
    model.add_adapter("both", [LoraConfig(r=2, targets=("value",), init="random"), ScaleConfig(init_std=0.3)])
    return model.eval()


def _run(model, x, adapters):
    with torch.no_grad():
        return model(**x, adapters=adapters).last_hidden_state


def test_the_toy_method_is_not_in_the_package(scale_method):
    import adapters_mtl

    source = "".join(
        p.read_text() for p in __import__("pathlib").Path(adapters_mtl.__file__).parent.rglob("*.py")
    )
    assert not re.search(r"\bScaleMethod\b|\"scale\"", source)
    assert get_method("scale") is scale_method


@pytest.mark.usefixtures("scale_method")
def test_routed_rows_equal_each_adapter_alone_and_stacks():
    model = _model()
    x = batch(6, 7, pad="right")
    rows = ["s1", None, "lora", "s2", ("lora", "s1"), "both"]
    mixed = _run(model, x, rows)
    for i, entry in enumerate(rows):
        alone = _run(model, x, entry)[i]
        torch.testing.assert_close(mixed[i], alone, atol=1e-6, rtol=0)
    base = _run(model, x, None)
    assert (mixed[0] - base[0]).abs().max() > 1e-2  # the toy adapter really changes the output
    # a stack of two scale adapters multiplies them: s1 then s2 == s2 then s1
    torch.testing.assert_close(_run(model, x, ("s1", "s2")), _run(model, x, ("s2", "s1")), atol=1e-5, rtol=0)
    with model.using("s2"):
        torch.testing.assert_close(
            _run(model, x, "s2"), model(**x).last_hidden_state.detach(), atol=0, rtol=0
        )


@pytest.mark.usefixtures("scale_method")
def test_save_load_bit_exact_and_peft_reads_it(tmp_path):
    model = _model()
    x = batch(3, 6)
    for name in ("s1", "both"):
        folder = save_adapter(model, name, tmp_path / name)
        card = json.loads((folder / "adapter_card.json").read_text())
        assert set(card["methods"]) == set(model.method_names(name))
        fresh = AdapterModel(tiny("bert")).eval()
        assert load_adapter(fresh, folder) == name
        want, got = model.adapter_parameters(name), fresh.adapter_parameters(name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        torch.testing.assert_close(_run(fresh, x, name), _run(model, x, name), atol=0, rtol=0)
    assert (tmp_path / "both" / "scale" / "adapter_config.json").is_file()  # second part in its sub-folder
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(tiny("bert")), str(tmp_path / "s1")).eval()
    with torch.no_grad():
        theirs = peft_model(**x).last_hidden_state
    torch.testing.assert_close(theirs, _run(model, x, "s1"), atol=1e-5, rtol=0)


@pytest.mark.usefixtures("scale_method")
def test_registry_publish_load_and_composer_use(tmp_path):
    model = _model()
    registry = AdapterRegistry(tmp_path / "reg")
    ref = registry.publish(save_adapter(model, "s2", tmp_path / "s2"))
    assert [r.ref for r in registry.list(method="scale")] == [ref]
    composer = Composer(AdapterModel(tiny("bert")), registry=registry)
    assert composer.use(ref) == composer.active
    x = batch(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(
            composer.model(**x).last_hidden_state, _run(model, x, "s2"), atol=0, rtol=0
        )


@pytest.mark.usefixtures("scale_method")
def test_merging_is_refused_clearly():
    model = _model()
    assert not model.has_factors("s1") and model.has_factors("lora") and not model.has_factors("both")
    with pytest.raises(ValueError, match="no part that is a weight update"):
        model.merge("s1")
    with pytest.raises(ValueError, match="not only weight updates"):
        model.factors("both")
