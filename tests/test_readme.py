"""The README's tour runs as written (so it stays true)."""

import re
from pathlib import Path

import pytest


@pytest.mark.slow
def test_readme_tour_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = scope["out"]
    assert out.row_logits[0].shape == (5,) and out.row_logits[1].shape == (3,) and out.row_logits[2] is None
