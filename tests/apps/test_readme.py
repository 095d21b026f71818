"""The README's Python examples run as written (so they stay true)."""

import re
from pathlib import Path

import pytest


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch):
    from adapters_mtl import AdapterModel
    from adapters_mtl.data.bases import load_minilm

    text = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    tour, files = blocks[:2]
    serving = next(b for b in blocks if "Composer(" in b)
    scope: dict = {}
    exec(compile(tour, "README.md (tour)", "exec"), scope)
    out = scope["out"]
    assert out.row_logits[0].shape == (5,) and out.row_logits[1].shape == (3,) and out.row_logits[2] is None

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTERS_MTL_REGISTRY", str(tmp_path / "registry"))
    scope["model"].unmerge()
    scope["other_model"] = AdapterModel(load_minilm()[0])
    exec(compile(files, "README.md (files)", "exec"), scope)
    assert scope["reg"].resolve("news@prod").ref == "news@1"
    assert sorted(scope["other_model"].adapter_names) == ["news", "news_copy"]
    exec(compile(serving, "README.md (serving)", "exec"), scope)
    assert scope["reg"].resolve("blend").ref == "blend@1"
    assert [e["ref"] for e in scope["composer"].loaded][:1] == ["news@1"]
