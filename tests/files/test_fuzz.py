"""Property-based fuzzing (hypothesis) of what users hand us: adapter folders (cards, PEFT configs,
safetensors headers and bytes, heads) and registry references. The property everywhere: a clear
``AdapterFileError`` / ``RegistryError`` / ``ValueError`` or success, never another exception or a hang, and
nothing attached or published on error."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from helpers import tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters_mtl import AdapterModel, HeadConfig, LoraConfig
from adapters_mtl.files.folder import AdapterFileError, load_adapter, save_adapter
from adapters_mtl.registry import AdapterRegistry, RegistryError

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
# JSON values of every shape, small
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny("bert", seed=4)
    model = AdapterModel(copy.deepcopy(base)).eval()
    model.add_adapter(
        "a", LoraConfig(r=2, targets=("query", "value"), init="random"), head=HeadConfig(num_labels=3)
    )
    root = tmp_path_factory.mktemp("fuzz")
    folder = save_adapter(model, "a", root / "good")
    fresh = AdapterModel(copy.deepcopy(base))
    registry = AdapterRegistry(root / "reg")
    return folder, fresh, registry


def _variant(good: Path, edit) -> Path:
    """A copy of the good folder with ``edit(folder)`` applied and checksums recomputed (so the fuzzed
    content reaches the parsers instead of stopping at the sha256 check)."""
    folder = Path(tempfile.mkdtemp(prefix="amtl-fuzz-")) / "a"
    shutil.copytree(good, folder)
    edit(folder)
    card_path = folder / "adapter_card.json"
    try:
        card = json.loads(card_path.read_text())
        for rel in list(card.get("files", {})):
            if (folder / rel).is_file():
                card["files"][rel] = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
        card_path.write_text(json.dumps(card))
    except (ValueError, AttributeError, TypeError, OSError):
        pass  # the fuzzed card itself is not an object of files: leave it as fuzzed
    return folder


def _check(setup, folder: Path) -> None:
    _, fresh, registry = setup
    before = [r.ref for r in registry.list()]
    try:
        name = load_adapter(fresh, folder, name="x")
    except AdapterFileError as e:
        assert str(e)
        assert fresh.adapter_names == [] and len(fresh.heads) == 0
    else:
        assert name == "x"
        fresh.remove_adapter("x")
    try:
        registry.publish(folder, name="fuzzed")
    except AdapterFileError as e:
        assert str(e)
        assert [r.ref for r in registry.list()] == before
    shutil.rmtree(folder.parent, ignore_errors=True)


@FUZZ
@given(card=JSON)
def test_fuzzed_cards(setup, card):
    _check(setup, _variant(setup[0], lambda f: (f / "adapter_card.json").write_text(json.dumps(card))))


@FUZZ
@given(
    field=st.sampled_from(["name", "head", "methods", "files", "base_fingerprint", "label_names", "task"]),
    value=JSON,
)
def test_fuzzed_card_fields(setup, field, value):
    def edit(f):
        card = json.loads((f / "adapter_card.json").read_text())
        if field == "files" and isinstance(value, dict):
            card["files"] = {**card["files"], **value}
        else:
            card[field] = value
        (f / "adapter_card.json").write_text(json.dumps(card))

    _check(setup, _variant(setup[0], edit))


# keys of a PEFT LoRA adapter_config.json whose value the fuzzer replaces
PEFT_CONFIG_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "peft_type"]
PEFT_CONFIG_KEYS += ["layers_to_transform", "use_dora", "modules_to_save", "init_lora_weights", "bias"]


@FUZZ
@given(key=st.sampled_from(PEFT_CONFIG_KEYS), value=JSON)
def test_fuzzed_peft_configs(setup, key, value):
    def edit(f):
        cfg = json.loads((f / "adapter_config.json").read_text())
        cfg[key] = value
        (f / "adapter_config.json").write_text(json.dumps(cfg))

    _check(setup, _variant(setup[0], edit))


@FUZZ
@given(
    cut=st.integers(0, 4000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=4),
    header_len=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_fuzzed_safetensors_bytes(setup, cut, flips, header_len):
    def edit(f):
        path = f / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        for pos, x in flips:
            if pos < len(data):
                data[pos] ^= x
        if header_len is not None:
            data[:8] = struct.pack("<Q", header_len)
        path.write_bytes(bytes(data[: len(data) - cut % max(len(data), 1)]))

    _check(setup, _variant(setup[0], edit))


@FUZZ
@given(header=st.dictionaries(st.text(max_size=30), JSON, max_size=4))
def test_fuzzed_safetensors_headers(setup, header):
    def edit(f):
        raw = json.dumps(header).encode()
        (f / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)

    _check(setup, _variant(setup[0], edit))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(ref=st.one_of(st.text(max_size=20), JSON))
def test_fuzzed_registry_references(setup, ref):
    registry = setup[2]
    try:
        registry.resolve(ref)
    except (RegistryError, ValueError) as e:
        assert str(e)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(name=st.text(max_size=70), alias=st.text(max_size=20))
def test_fuzzed_publish_names_and_aliases(setup, name, alias):
    folder, _, registry = setup
    before = [r.ref for r in registry.list()]
    try:
        ref = registry.publish(folder, name=name, aliases=[alias])
    except (ValueError, RegistryError) as e:
        assert str(e) and [r.ref for r in registry.list()] == before
    else:
        assert registry.resolve(f"{name}@{alias}").ref == ref
        registry.remove(ref)


# ----------------------------------------------------------------------------------------- recipes
RECIPES = Path(__file__).parents[2] / "recipes"
RECIPE_TEXT = (RECIPES / "joint_mtl.yaml").read_text()
KEYS = [
    "base",
    "tasks",
    "tasks.0",
    "tasks.0.name",
    "tasks.0.max_length",
    "tasks.0.limit",
    "tasks.0.splits",
    "tasks.1.label_column",
    "adapter",
    "adapter.r",
    "adapter.targets",
    "train",
    "train.lr",
    "train.steps",
    "train.batch_size",
    "train.sampling",
    "train.weighting",
    "train.patience",
    "registry",
    "compose",
]
YAML_SCALARS = st.sampled_from(
    [
        "1e-3",
        "-5",
        "0",
        "yes",
        "no",
        "~",
        "[]",
        "{}",
        "'7'",
        ".nan",
        "-.inf",
        "2026-11-29",
        "!!python/object:os.system",
        "*a",
        "&a 1",
        "0x1F",
        "1_000",
        "[0.9, 0.1, 0.0]",
        "{x: 1}",
        '"\\u0000"',
    ]
)


def _load_or_refuse(text: str, overrides: list[str]) -> None:
    from adapters_mtl.apps.recipe import RecipeError, load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(text)
        try:
            recipe = load_recipe(path, overrides)
        except RecipeError as e:
            assert str(e)
        else:
            assert isinstance(recipe, dict) and recipe["tasks"]


@FUZZ
@given(text=st.text(max_size=300))
def test_fuzzed_recipe_text(text):
    _load_or_refuse(text, [])


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(KEYS), st.one_of(YAML_SCALARS, st.text(max_size=12))), max_size=4
    )
)
def test_fuzzed_recipe_overrides(edits):
    _load_or_refuse(RECIPE_TEXT, [f"{k}={v}" for k, v in edits])


@FUZZ
@given(lines=st.lists(st.integers(0, 200), max_size=3), junk=st.lists(YAML_SCALARS, min_size=1, max_size=3))
def test_fuzzed_recipe_lines(lines, junk):
    """Replace the value of random lines of a real recipe with YAML oddities (tags, aliases, nulls)."""
    out = RECIPE_TEXT.splitlines()
    for i, line in enumerate(lines):
        j = line % len(out)
        if ":" in out[j]:
            out[j] = out[j].split(":", 1)[0] + ": " + junk[i % len(junk)]
    _load_or_refuse("\n".join(out), [])
