"""Prompt tuning through the method protocol, on BERT-, Llama- and GPT-2-like tiny models: routed rows ==
each alone (prompts of different lengths, LoRA rows, stacks and bare rows in one batch, left and right
padding), PEFT reads what we write and we read what PEFT writes (same outputs at the text positions),
save/load bit-exact, generation with a KV cache, gradients only where routed, and clear errors."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from helpers import LORA_TARGETS, PAD, batch, minilm_tokenizer, output, tiny

from adapters_mtl import AdapterModel, HeadConfig, LoraConfig
from adapters_mtl.files.folder import AdapterFileError, load_adapter, save_adapter
from adapters_mtl.methods.prompt_config import PromptConfig

FAMILIES = ("bert", "llama", "gpt2")
TASK = {"bert": "FEATURE_EXTRACTION", "llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM"}
ROWS = ["p3", None, "p5", "lora", ("lora", "p5"), "p3"]


def _model(family: str) -> AdapterModel:
    model = AdapterModel(tiny(family))
    torch.manual_seed(5)
    model.add_adapter("p3", PromptConfig(num_virtual_tokens=3))
    model.add_adapter("p5", PromptConfig(num_virtual_tokens=5))
    model.add_adapter("lora", LoraConfig(r=2, targets=LORA_TARGETS[family], init="random"))
    with torch.no_grad():  # N(0, 1) prompts drown a tiny model's 0.02-scale embeddings: keep the text visible
        for name in ("p3", "p5"):
            model.adapter_parameters(name)["prompt.embeddings"].mul_(0.2)
    return model.eval()


def _run(model, x, family, adapters):
    with torch.no_grad():
        return output(model(**x, adapters=adapters), family)


def _prompt(model, name):
    return model.adapter_parameters(name)["prompt.embeddings"]


def _peft(family, prompt):
    """PEFT's PeftModel on a fresh copy of the same base, holding ``prompt`` (P, D)."""
    cfg = peft.PromptTuningConfig(num_virtual_tokens=prompt.shape[0], task_type=TASK[family])
    theirs = peft.get_peft_model(tiny(family), cfg).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(prompt)
    return theirs


# ------------------------------------------------------------------------------------------ routing
@pytest.mark.parametrize("pad", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_routed_rows_equal_each_alone_and_the_output_lines_up_with_the_input(family, pad):
    model = _model(family)
    x = batch(len(ROWS), 7, pad=pad)
    mixed = _run(model, x, family, ROWS)
    assert mixed.shape[:2] == (len(ROWS), 7)  # the virtual positions are stripped
    mask = x["attention_mask"].bool()
    for i, entry in enumerate(ROWS):
        same_batch = _run(model, x, family, entry)[i]  # every row routed like row i
        alone = _run(model, {k: v[i : i + 1] for k, v in x.items()}, family, entry)[0]
        torch.testing.assert_close(mixed[i][mask[i]], same_batch[mask[i]], atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed[i][mask[i]], alone[mask[i]], atol=1e-5, rtol=0)
    bare = _run(model, x, family, None)
    assert (mixed[0] - bare[0]).abs().max() > 1e-2  # the prompt really acts
    assert (_run(model, x, family, "p3")[0] - _run(model, x, family, "p5")[0]).abs().max() > 1e-2
    # a stack applies both: LoRA and the prompt
    stacked = mixed[4][mask[4]]
    assert (stacked - _run(model, x, family, "lora")[4][mask[4]]).abs().max() > 1e-2
    assert (stacked - _run(model, x, family, "p5")[4][mask[4]]).abs().max() > 1e-2


def test_the_pooler_of_a_mixed_batch_reads_each_rows_own_first_position():
    model = _model("bert")
    x = batch(len(ROWS), 7, pad="right")
    with torch.no_grad():
        mixed = model(**x, adapters=ROWS).pooler_output
        for i, entry in enumerate(ROWS):
            alone = model(**{k: v[i : i + 1] for k, v in x.items()}, adapters=entry).pooler_output[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_heads_of_prompt_adapters_read_the_text_positions(family):
    model = _model(family)
    model.add_adapter("cls", PromptConfig(num_virtual_tokens=4), head=HeadConfig(num_labels=3))
    model.add_adapter(
        "tags", PromptConfig(num_virtual_tokens=2), head=HeadConfig(kind="token_cls", num_labels=2)
    )
    model.add_adapter(
        "mean", PromptConfig(num_virtual_tokens=6), head=HeadConfig(num_labels=2, pooling="mean")
    )
    names = ["cls", "tags", None, "mean", "lora", "tags"]
    x = batch(len(names), 8, pad=PAD[family])
    with torch.no_grad():
        out = model(**x, adapters=names)
        assert out.last_hidden_state.shape[:2] == (len(names), 8)
        assert [tuple(t.shape) if t is not None else None for t in out.row_logits] == [
            (3,),
            (8, 2),
            None,
            (2,),
            None,
            (8, 2),
        ]
        for i, name in enumerate(names):
            if name not in model.heads:
                continue
            alone = model(**{k: v[i : i + 1] for k, v in x.items()}, adapters=name).row_logits[0]
            valid = x["attention_mask"][i].bool() if alone.dim() == 2 else slice(None)
            torch.testing.assert_close(out.row_logits[i][valid], alone[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_cache_continues_the_call_that_filled_it(family):
    model = _model(family)
    x = batch(len(ROWS), 8, pad="left")
    with torch.no_grad():
        full = model(**x, adapters=ROWS).logits
        first = model(
            input_ids=x["input_ids"][:, :5],
            attention_mask=x["attention_mask"][:, :5],
            adapters=ROWS,
            use_cache=True,
        )
        rest = model(
            input_ids=x["input_ids"][:, 5:],
            attention_mask=x["attention_mask"],
            cache=first.past_key_values,
            adapters=ROWS,
        )
    torch.testing.assert_close(rest.logits, full[:, 5:], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ PEFT
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_equal_peft_at_the_text_positions(family):
    model = _model(family)
    x = batch(4, 7, pad=PAD[family])
    mask = x["attention_mask"].bool()
    worst = 0.0
    for name, P in (("p3", 3), ("p5", 5)):
        with torch.no_grad():
            theirs = _peft(family, _prompt(model, name))(**x)
            ours = model(**x, adapters=name)
        diff = (output(theirs, family)[:, P:][mask] - output(ours, family)[mask]).abs().max().item()
        worst = max(worst, diff)
        if family == "bert":  # PEFT's pooler reads the first virtual token, and so does ours
            torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, atol=1e-5, rtol=0)
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_reads_ours_and_we_read_peft(family, tmp_path):
    model = _model(family)
    x = batch(3, 6, pad=PAD[family])
    mask = x["attention_mask"].bool()
    folder = save_adapter(model, "p5", tmp_path / "p5")
    theirs = peft.PeftModel.from_pretrained(tiny(family), str(folder)).eval()
    assert isinstance(theirs.peft_config["default"], peft.PromptTuningConfig)
    with torch.no_grad():
        got = output(theirs(**x), family)[:, 5:]
    torch.testing.assert_close(got[mask], _run(model, x, family, "p5")[mask], atol=1e-5, rtol=0)
    # the other way: a prompt PEFT made (its own random init) loads and gives PEFT's outputs
    torch.manual_seed(9)
    made = peft.get_peft_model(
        tiny(family), peft.PromptTuningConfig(num_virtual_tokens=4, task_type=TASK[family])
    ).eval()
    made.save_pretrained(str(tmp_path / "peft"))
    ours = AdapterModel(tiny(family)).eval()
    assert load_adapter(ours, tmp_path / "peft", name="p") == "p"
    assert torch.equal(_prompt(ours, "p"), made.prompt_encoder["default"].embedding.weight)
    with torch.no_grad():
        want = output(made(**x), family)[:, 4:]
    torch.testing.assert_close(_run(ours, x, family, "p")[mask], want[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_bit_exact(family, tmp_path):
    model = _model(family)
    x = batch(3, 6, pad=PAD[family])
    folder = save_adapter(model, "p3", tmp_path / "p3")
    fresh = AdapterModel(tiny(family)).eval()
    load_adapter(fresh, folder)
    want, got = model.adapter_parameters("p3"), fresh.adapter_parameters("p3")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    torch.testing.assert_close(_run(fresh, x, family, "p3"), _run(model, x, family, "p3"), atol=0, rtol=0)
    assert fresh.added_positions("p3") == 3


def test_a_lora_and_prompt_adapter_saves_both_parts_and_reloads(tmp_path):
    model = _model("llama")
    model.add_adapter(
        "both", [LoraConfig(r=2, targets=("q_proj",), init="random"), PromptConfig(num_virtual_tokens=2)]
    )
    x = batch(3, 6, pad="left")
    folder = save_adapter(model, "both", tmp_path / "both")
    assert (folder / "prompt" / "adapter_model.safetensors").is_file()
    fresh = AdapterModel(tiny("llama")).eval()
    load_adapter(fresh, folder)
    torch.testing.assert_close(
        _run(fresh, x, "llama", "both"), _run(model, x, "llama", "both"), atol=0, rtol=0
    )


# ------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_routed_generate_equals_each_row_alone(family):
    model = _model(family)
    names = ["p3", None, "p5", "lora", ("lora", "p5")]
    x = batch(len(names), 6, pad="left")
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(**x, adapters=names, **kw)
        assert torch.equal(mixed, model.generate(**x, adapters=names, use_cache=False, **kw))
        for i, name in enumerate(names):
            alone = model.generate(**{k: v[i : i + 1] for k, v in x.items()}, adapters=name, **kw)
            assert torch.equal(mixed[i], alone[0]), f"row {i} ({name}) differs when generated alone"
        assert len({tuple(r[-5:].tolist()) for r in mixed}) > 2, "adapters had no effect on generation"
        beams = model.generate(**x, adapters=names, num_beams=3, **kw)
        for i, name in enumerate(names):
            alone = model.generate(
                **{k: v[i : i + 1] for k, v in x.items()}, adapters=name, num_beams=3, **kw
            )
            assert torch.equal(beams[i], alone[0]), f"beam search row {i} ({name}) differs when run alone"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_equals_greedy_decoding_with_peft_forward(family):
    # (PEFT 0.21's own KV-cache generate re-injects the prompt on transformers 5 and disagrees with its
    # use_cache=False generate, so the reference is greedy decoding with PeftModel's forward.)
    model = _model(family)
    x = batch(3, 6)
    theirs = _peft(family, _prompt(model, "p5"))
    with torch.no_grad():
        ours = model.generate(
            **x, adapters="p5", max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
        )
        ids = x["input_ids"]
        for _ in range(6):
            logits = theirs(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, ids)


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_the_routed_prompt_and_the_base_stays(family):
    model = _model(family).train()
    x = batch(4, 6, pad=PAD[family])
    before = {k: v.clone() for k, v in model.base_parameters().items()}
    output(model(**x, adapters=["p3", None, "p3", None]), family).float().pow(2).mean().backward()
    assert _prompt(model, "p3").grad is not None and _prompt(model, "p3").grad.abs().sum() > 0
    assert all(p.grad is None for n in ("p5", "lora") for p in model.adapter_parameters(n).values())
    torch.optim.SGD(model.trainable_parameters(), lr=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in model.base_parameters().items())
    # a mixed batch's gradient is the sum of its rows' gradients
    model.zero_grad()
    rows = ["p3", "lora", "p5", ("lora", "p3")]
    output(model(**x, adapters=rows), family).float().pow(2).sum().backward()
    mixed = {n: _prompt(model, n).grad.clone() for n in ("p3", "p5")}
    model.zero_grad()
    for i, entry in enumerate(rows):
        output(model(**{k: v[i : i + 1] for k, v in x.items()}, adapters=entry), family).float().pow(
            2
        ).sum().backward()
    for n in ("p3", "p5"):
        torch.testing.assert_close(mixed[n], _prompt(model, n).grad, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.base_parameters().items())


def test_activation_checkpointing_recomputes_the_active_prompt_exactly():
    def grad(checkpointing: bool) -> torch.Tensor:
        model = _model("llama")
        if checkpointing:
            model.base.activation_checkpointing_enable()
        model.activate("p5")
        model.train()
        model(**batch(2, 6)).logits.pow(2).mean().backward()
        return _prompt(model, "p5").grad

    plain = grad(False)
    torch.testing.assert_close(grad(True), plain, atol=1e-6, rtol=1e-5)
    assert plain.abs().sum() > 0


def test_a_seeded_short_run_lowers_the_lm_loss_of_the_prompt_only():
    model = AdapterModel(tiny("llama"))
    torch.manual_seed(0)
    model.add_adapter("p", PromptConfig(num_virtual_tokens=4, init="sample_vocab"))
    frozen = {k: v.clone() for k, v in model.base_parameters().items()}
    x = batch(8, 6, pad="left", seed=3)
    # a task a prompt can learn: whatever the text, the next token is 7
    labels = torch.full_like(x["input_ids"], 7).masked_fill(x["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=0.05)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(**x, labels=labels, adapters="p").loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # a tiny random LM's logits span little (0.02-scale weights): the reachable drop is a few tenths
    assert losses[-1] < losses[0] - 0.15 and losses[-1] < losses[5], losses
    assert model.trainable_parameters() == [_prompt(model, "p")]
    assert all(torch.equal(frozen[k], v) for k, v in model.base_parameters().items())


# ------------------------------------------------------------------------------------------ configs
def test_text_init_uses_the_texts_word_embeddings_as_peft_does():
    from adapters_mtl.data.bases import minilm_path

    tok = minilm_tokenizer()
    text = "classify the topic"
    ids = tok(text)["input_ids"]  # with [CLS] and [SEP], as PEFT tokenizes it
    base = tiny("bert", vocab_size=tok.vocab_size)
    model = AdapterModel(copy.deepcopy(base))
    P = len(ids) + 2  # longer than the text: the ids repeat
    model.add_adapter("obj", PromptConfig(num_virtual_tokens=P, init="text", init_text=text, tokenizer=tok))
    model.add_adapter(
        "path",
        PromptConfig(
            num_virtual_tokens=P, init="text", init_text=text, tokenizer_name_or_path=str(minilm_path())
        ),
    )
    peft_cfg = peft.PromptTuningConfig(
        num_virtual_tokens=P,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(minilm_path()),
        task_type="FEATURE_EXTRACTION",
    )
    model.add_adapter("peft", peft_cfg)
    want = base.get_input_embeddings().weight[(ids * 2)[:P]]
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(peft_cfg))
    torch.testing.assert_close(theirs.prompt_encoder["default"].embedding.weight, want, atol=0, rtol=0)
    for name in ("obj", "path", "peft"):
        torch.testing.assert_close(_prompt(model, name), want, atol=0, rtol=0)
    assert model.adapter_config("obj")[0].init_token_ids == tuple(ids)


def test_bad_configs_are_refused_with_every_problem_named():
    with pytest.raises(ValueError, match=r"num_virtual_tokens must be a positive int.*init must be one of"):
        PromptConfig(num_virtual_tokens=0, init="zeros")
    with pytest.raises(ValueError, match="needs init_text"):
        PromptConfig(init="text")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PromptConfig(init="text", init_text="hi")
    with pytest.raises(ValueError, match="only with init='text'"):
        PromptConfig(init_text="hi")
    with pytest.raises(ValueError, match="does not resolve locally"):
        PromptConfig(init="text", init_text="hi", tokenizer_name_or_path="/nonexistent/no-such-tokenizer")
    with pytest.raises(ValueError, match="does not resolve locally"):
        peft_cfg = peft.PromptTuningConfig(
            num_virtual_tokens=2,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text="hi",
            tokenizer_name_or_path="/nonexistent/no-such-tokenizer",
        )
        AdapterModel(tiny("bert")).add_adapter("p", peft_cfg)
    with pytest.raises(ValueError, match="encoder-decoder"):
        PromptConfig.from_peft(peft.PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=2))
    model = AdapterModel(tiny("gpt2"))  # 128 positions
    with pytest.raises(ValueError, match="leaves no room"):
        model.add_adapter("long", PromptConfig(num_virtual_tokens=128))
    with pytest.raises(ValueError, match=r"outside this base's vocabulary of 120"):
        model.add_adapter(
            "ids", PromptConfig(num_virtual_tokens=2, init="text", init_text="x", init_token_ids=(5, 500))
        )
    assert model.adapter_names == []
    # the saved form round-trips through the card's JSON (lists become tuples again)
    cfg = PromptConfig(num_virtual_tokens=3, init="text", init_text="x", init_token_ids=[4, 5])
    assert cfg.init_token_ids == (4, 5) and cfg.init_ids() == [4, 5, 4]


def test_two_prompts_in_one_stack_are_refused():
    model = _model("llama")
    x = batch(2, 5)
    with pytest.raises(ValueError, match=r"stacks prompt adapters \['p3', 'p5'\].*at most one prompt"):
        model(**x, adapters=[("p3", "p5"), None])
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(
            input_ids=x["input_ids"], attention_mask=torch.ones(2, 1, 5, 5, dtype=torch.bool), adapters="p3"
        )


def test_a_prompt_made_for_another_width_is_refused(tmp_path):
    made = peft.get_peft_model(
        tiny("llama"), peft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    )
    made.save_pretrained(str(tmp_path / "p"))
    wider = AdapterModel(tiny("llama", hidden_size=64))
    with pytest.raises(AdapterFileError, match="token_dim=32 but this base model's word embeddings are 64"):
        load_adapter(wider, tmp_path / "p")
    assert wider.adapter_names == []
