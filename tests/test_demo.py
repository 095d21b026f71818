"""`make demo` on the real packaged MiniLM: routed rows equal rows run alone; merge is exact enough."""

import pytest


@pytest.mark.slow
def test_demo_runs_on_real_minilm():
    from adapters_mtl.demo import run_demo

    numbers = run_demo(seed=0)
    assert numbers["max_routed_diff"] < 1e-5
    assert 0 < numbers["merge_err"] < 1e-4  # non-identity adapter, folded into the weights
    assert numbers["swap_us"] < 100
