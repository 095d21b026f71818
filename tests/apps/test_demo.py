"""`make demo` on the real packaged MiniLM and corpora (shortened): it trains, publishes, routes and merges."""

import pytest


@pytest.mark.slow
def test_demo_trains_publishes_and_serves_on_real_minilm(tmp_path):
    from pathlib import Path

    from adapters_mtl.apps.demo import run_demo

    numbers = run_demo(seed=0, steps=30, out=tmp_path / "demo")
    assert set(numbers["published"]) == {"news", "tone"}
    assert numbers["test"]["news"]["accuracy"] > 0.35  # 5 classes: chance is 0.2 after 30 steps
    assert numbers["max_routed_diff"] < 1e-5
    assert 0 < numbers["merge_err"] < 1e-3 and numbers["unmerge_exact"]
    assert numbers["swap_us"] < 100
    assert Path(numbers["plot"]).read_bytes()[:4] == b"\x89PNG"
