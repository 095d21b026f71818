"""Concurrency: many threads calling one model / one Composer with different adapters.

Routing state belongs to one call (per thread), never to the shared model: every answer computed under
8 threads must equal the same call made alone, and the process-wide default must be untouched after.
Also the clear errors for malformed routing entries and over-long inputs.
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import LORA_TARGETS, batch, classifier_registry, composer, minilm_tokenizer, tiny

from adapters_mtl import AdapterModel, LoraConfig, PrefixConfig
from adapters_mtl.serving.composer import Composer, ComposerError

THREADS, CALLS = 8, 50
TEXTS = ["the match ended in a draw", "parliament votes today", "what a lovely day", "stocks fell sharply"]


def _hammer(jobs, calls: int = CALLS) -> tuple[list, list]:
    """Run ``jobs[i]()`` ``calls`` times in thread i (all threads start together).

    Each job returns True when its answer equals the single-threaded one. Returns (wrong, errors).
    """
    barrier = threading.Barrier(len(jobs))
    wrong, errors = [], []

    def worker(i: int) -> None:
        barrier.wait()
        for k in range(calls):
            try:
                if not jobs[i]():
                    wrong.append((i, k))
            except Exception as e:  # noqa: BLE001 - collected and reported by the test
                errors.append(f"thread {i} call {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    intra = torch.get_num_threads()
    torch.set_num_threads(1)  # the threads are the parallelism here; intra-op threads would oversubscribe
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(intra)
    return wrong, errors


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-6)


# ---------------------------------------------------------------------------------------- bare model
def _model() -> AdapterModel:
    model = AdapterModel(tiny("llama")).eval()
    torch.manual_seed(0)
    model.add_adapter("a", LoraConfig(r=2, targets=LORA_TARGETS["llama"], init="random"))
    model.add_adapter("b", LoraConfig(r=4, targets=LORA_TARGETS["llama"], init="random"))
    model.add_adapter("p", PrefixConfig(num_virtual_tokens=3))
    with torch.no_grad():
        for p in [*model.adapter_parameters("a").values(), *model.adapter_parameters("b").values()]:
            p.mul_(10)  # updates large enough that any mix-up shows in the logits
    model.activate("a")
    return model


ROUTES = ["b", ["a", "b", None, "p"], None, ("a", "b"), "p", ["p", "p", "b", "a"], [None, "a", "p", "b"]]


def test_routed_forwards_in_threads_equal_the_same_calls_alone():
    model = _model()
    x = batch(4, 6, pad="left")
    with torch.no_grad():
        want = [model(**x, adapters=r).logits for r in ROUTES]
        want_plain = model(**x).logits  # the default: "a"
        want_gen = model.generate(**x, adapters=["b", "p", None, "a"], max_new_tokens=3, do_sample=False)

    def routed(r, w):
        return lambda: _close(model(**x, adapters=r).logits, w)

    def generate():
        got = model.generate(**x, adapters=["b", "p", None, "a"], max_new_tokens=3, do_sample=False)
        return torch.equal(got, want_gen)

    jobs = [routed(r, w) for r, w in zip(ROUTES, want, strict=True)]
    jobs.append(lambda: _close(model(**x).logits, want_plain))
    with torch.no_grad():
        wrong, errors = _hammer(jobs)
        gen_wrong, gen_errors = _hammer([generate] * 2, calls=5)
        assert errors == [] and gen_errors == []
        assert len(wrong) == 0, f"{len(wrong)}/{len(jobs) * CALLS} answers wrong"
        assert gen_wrong == []
        # the shared default survived: a plain call is still adapter "a"
        assert model.active_adapter == "a"
        assert torch.equal(model(**x).logits, want_plain)


def test_using_in_threads_is_per_thread_and_leaves_the_default_alone():
    model = _model()
    x = batch(4, 6)
    names = ["a", "b", None, "p", ("a", "b"), "b", "p", None]
    with torch.no_grad():
        want = {n: model(**x, adapters=n).logits for n in names}
        want_plain = model(**x).logits

    def job(name):
        def run():
            with model.using(name):
                ok = model.active_adapter == name and _close(model(**x).logits, want[name])
                # a routed call inside the block routes; the block's adapter comes back after it
                ok = ok and _close(model(**x, adapters="b").logits, want["b"])
                return ok and _close(model.base(**x).logits, want[name])  # the base sees it too

        return run

    with torch.no_grad():
        wrong, errors = _hammer([job(n) for n in names], calls=25)
        assert errors == [] and wrong == [], f"{len(wrong)} wrong, errors {errors[:3]}"
        assert model.active_adapter == "a" and torch.equal(model(**x).logits, want_plain)


def test_a_compiled_model_follows_each_threads_routing():
    """The routing read sits inside compiled layers: it must be guarded data, not a graph break."""
    from torch._dynamo.testing import CompileCounter

    torch.compiler.reset()
    model = _model()
    model.static_routing(True)
    counter = CompileCounter()
    compiled = torch.compile(model.base, backend=counter)
    x = batch(2, 5)
    got = {}

    def other_thread():  # sees the default ("a"), not the using() block of the main thread
        got["other"] = compiled(**x).logits

    with torch.no_grad():
        want = {n: model(**x, adapters=n).logits for n in ("a", "b")}
        torch.testing.assert_close(compiled(**x).logits, want["a"], atol=1e-5, rtol=0)
        assert counter.frame_count == 1  # no graph break at the routing read in any layer
        with model.using("b"):
            torch.testing.assert_close(compiled(**x).logits, want["b"], atol=1e-5, rtol=0)
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
        torch.testing.assert_close(got["other"], want["a"], atol=1e-5, rtol=0)
        torch.testing.assert_close(compiled(**x).logits, want["a"], atol=1e-5, rtol=0)
    torch.compiler.reset()


# ---------------------------------------------------------------------------------------- composer
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny BERT with the real MiniLM tokenizer, and a registry holding 4 classifiers + a prefix one."""
    labels = [("x", "y", "z")] * 4
    base, tok, registry, _ = classifier_registry(tmp_path_factory.mktemp("reg"), labels, prefix_labels=3)
    return base, tok, registry


REFS = ["task0", "task1", "task2", "task3", "pre"]


def _same(got, want) -> bool:
    return len(got) == len(want) and all(
        g.adapter == w.adapter
        and g.label == w.label
        and max(abs(g.scores[k] - w.scores[k]) for k in w.scores) <= 1e-6
        for g, w in zip(got, want, strict=True)
    )


def _row_sets():
    """One routing per thread: single adapters, mixed rows, and the active adapter (None)."""
    return [
        "task1",
        ["task0", "task1", "task2", "task3"],
        None,
        "pre",
        ["pre", "task2", "pre", "task0"],
        "task3",
        ["task3", "task3", "task1", "pre"],
        "task2",
    ]


def test_routed_predicts_in_threads_equal_the_same_calls_alone(world):
    c = composer(world)
    c.use("task0")
    want = [c.predict(TEXTS, adapters=r) for r in _row_sets()]
    jobs = [
        lambda r=r, w=w: _same(c.predict(TEXTS, adapters=r), w)
        for r, w in zip(_row_sets(), want, strict=True)
    ]
    wrong, errors = _hammer(jobs)
    assert errors == [] and wrong == [], f"{len(wrong)}/{THREADS * CALLS} wrong, errors {errors[:3]}"
    assert c.active == "task0" and _same(c.predict(TEXTS), want[2])


def test_using_blocks_in_threads_equal_the_same_calls_alone(world):
    c = composer(world)
    refs = [*REFS, "task1", "pre", "task3"]
    want = {r: c.predict(TEXTS, adapters=r) for r in REFS}
    c.use("task2")

    def job(ref):
        def run():
            with c.using(ref) as name:
                return c.active == name == ref and _same(c.predict(TEXTS), want[ref])

        return run

    wrong, errors = _hammer([job(r) for r in refs])
    assert errors == [] and wrong == [], f"{len(wrong)}/{THREADS * CALLS} wrong, errors {errors[:3]}"
    assert c.active == "task2" and _same(c.predict(TEXTS), want["task2"])


def test_concurrent_predicts_that_evict_never_fail_nor_mix_up(world):
    want = {r: composer(world).predict(TEXTS, adapters=r) for r in REFS}
    mixed = ["task3", "pre", "pre", "task3"]  # as many adapters as the budget holds, in one call
    want_mixed = composer(world).predict(TEXTS, adapters=mixed)
    c = composer(world, max_adapters=2)
    jobs = [lambda r=r: _same(c.predict(TEXTS, adapters=r), want[r]) for r in [*REFS, "task1", "pre"]]
    jobs.append(lambda: _same(c.predict(TEXTS, adapters=mixed), want_mixed))
    wrong, errors = _hammer(jobs, calls=20)
    assert errors == [] and wrong == [], f"{len(wrong)} wrong, errors {errors[:3]}"
    # the budget is met again once no call holds an adapter
    assert len(c.loaded) <= 2 and sorted(c.model.adapter_names) == sorted(e["name"] for e in c.loaded)


def test_adapters_in_use_are_never_unloaded_and_base_merges_wait_for_idle(world):
    c = composer(world, max_adapters=1)
    with c.using("task1"):
        assert c.predict(TEXTS[:1], adapters="task2")[0].adapter == "task2@1"  # over budget for a moment
        assert [e["ref"] for e in c.loaded] == ["task1@1"]  # met again when that call ended
        with pytest.raises(ComposerError, match="in use by 1 call"):
            c.unload("task1")
        with pytest.raises(ComposerError, match=r"refused while 1 call\(s\) or using\(\) block"):
            c.merge(["task1"], into="base")
        assert c.model.merged_adapter is None
    c.merge(["task1"], into="base")  # idle now
    c.unmerge()


# ---------------------------------------------------------------------------------------- clear errors
def test_malformed_routing_entries_say_what_was_received_and_expected():
    model = _model()
    x = batch(2, 5)
    with pytest.raises(TypeError, match=r"row 0: got int 3.*adapter name, None, or a tuple of names"):
        model(**x, adapters=[3, "a"])
    with pytest.raises(TypeError, match=r"row 1: got list \['a', 'b'\].*a stack is a tuple.*\('a', 'b'\)"):
        model(**x, adapters=["a", ["a", "b"]])
    with pytest.raises(TypeError, match=r"got list \['a', 'b'\].*tuple"):
        model.activate(["a", "b"])
    with pytest.raises(TypeError, match=r"row 0: got tuple \('a', 2\).*names"):
        model(**x, adapters=[("a", 2), None])
    with pytest.raises(TypeError, match=r"got float 1.5"):
        model(**x, adapters=1.5)


def test_composer_routing_entries_that_are_not_references_are_named(world):
    c = composer(world)
    with pytest.raises(ComposerError, match=r"row 0: got int 3.*registry reference.*None.*tuple") as e:
        c.predict(TEXTS[:2], adapters=[3, ["task1"]])
    assert "row 1: got list ['task1']" in str(e.value)  # every problem at once
    assert "classification head" not in str(e.value) and c.loaded == []  # nothing loaded either


def test_predict_truncates_long_text_to_the_base_positions(world):
    c = composer(world)  # max_position_embeddings=64, tokenizer max length 512
    long = " ".join(["word"] * 300)
    longer = " ".join(["word"] * 600)
    for ref in ("task1", "pre"):  # a prefix shifts positions by 3
        got = c.predict([long, longer], adapters=ref)
        assert got[0].label == got[1].label and got[0].scores == pytest.approx(got[1].scores, abs=1e-6)


def test_generate_refuses_prompts_past_the_base_positions():
    tok = minilm_tokenizer()
    model = AdapterModel(tiny("llama", vocab_size=tok.vocab_size, max_position_embeddings=32))
    model.add_adapter("a", LoraConfig(r=2, targets=LORA_TARGETS["llama"], init="random"))
    c = Composer(model, registry=None, tokenizer=tok)
    assert len(c.generate(["hello there"], adapters="a", max_new_tokens=4)) == 1
    with pytest.raises(ComposerError, match=r"max_position_embeddings=32.*max_new_tokens=20"):
        c.generate(["hello there", " ".join(["word"] * 20)], adapters="a", max_new_tokens=20)
