"""Shared test helpers: tiny random models built from configs (fast, no downloads), batches, configs,
small synthetic CSV tasks and the registries the serving tests read.

Imported as ``from helpers import ...`` (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import copy
import functools
import operator
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adapters_mtl import AdapterModel, HeadConfig, LoraConfig, PrefixConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from adapters_mtl.data.tasks import TaskData
    from adapters_mtl.registry import AdapterRegistry
    from adapters_mtl.serving.composer import Composer
    from adapters_mtl.training import TrainConfig

V = 120  # vocabulary of every tiny model; batch() draws ids in [3, 120)
# config values of the tiny models; a test changes one with dict(BERT, key=value) or hf_model's overrides.
# SIZES: the shape of every tiny model, in the names BERT, Llama and their kin (ModernBERT...) share
SIZES: dict[str, Any] = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=128,
    attn_implementation="sdpa",
)
# BERT and the configs that share its names (RoBERTa, XLM-R, DeBERTa-v2)
BERT: dict[str, Any] = dict(SIZES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# Llama and the decoders that share its names (Qwen, Mistral, Gemma, Phi-3)
LLAMA: dict[str, Any] = dict(SIZES, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DISTILBERT: dict[str, Any] = dict(
    vocab_size=V,
    dim=32,
    n_layers=2,
    n_heads=4,
    hidden_dim=48,
    max_position_embeddings=128,
    dropout=0.0,
    attention_dropout=0.0,
    attn_implementation="sdpa",
)
GPT2: dict[str, Any] = dict(
    vocab_size=V,
    n_embd=32,
    n_layer=2,
    n_head=4,
    n_positions=128,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    attn_implementation="sdpa",
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_model(model_cls: str, config_cls: str, config: dict[str, Any], **overrides: Any) -> torch.nn.Module:
    """A random transformers `model_cls` (train mode) of a `config_cls` holding `config` and `overrides`."""
    import transformers

    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**config, **overrides}))


FAMILIES = {
    "bert": functools.partial(hf_model, "BertModel", "BertConfig", BERT),
    "llama": functools.partial(hf_model, "LlamaForCausalLM", "LlamaConfig", LLAMA),
    "gpt2": functools.partial(hf_model, "GPT2LMHeadModel", "GPT2Config", GPT2),
}
# Targets with different ranks per family exercise per-module ranks too.
LORA_TARGETS = {
    "bert": ("query", "value", "dense"),
    "llama": ("q_proj", "v_proj", "down_proj"),
    "gpt2": ("c_attn", "c_fc"),
}


def tiny(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random `family` model in eval mode; `overrides` change its config."""
    torch.manual_seed(seed)
    return FAMILIES[family](**overrides).eval()


def batch(B: int = 4, T: int = 7, seed: int = 1, pad: str | None = None) -> dict[str, torch.Tensor]:
    """input_ids (B, T) avoiding special ids, and an attention mask with some padding if `pad` is set."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        for i in range(1, B, 2):
            n = min(i + 1, T - 2)
            if pad == "right":
                mask[i, T - n :] = 0
            else:
                mask[i, :n] = 0
    return {"input_ids": ids, "attention_mask": mask}


def make_config(method: str, family: str, seed: int) -> LoraConfig | PrefixConfig | list:
    """A non-identity adapter config of `method` (LoRA B random so merges are really exercised)."""
    lora = LoraConfig(
        r=4,
        alpha=8,
        targets=LORA_TARGETS[family],
        init="random",
        use_rslora=seed % 2 == 1,
        rank_pattern={LORA_TARGETS[family][0]: 2 + seed},
    )
    prefix = PrefixConfig(num_virtual_tokens=3 + seed, projection=seed % 2 == 1)
    return {"lora": lora, "prefix": prefix, "lora+prefix": [lora, prefix]}[method]


def assert_rows_alone(
    model: AdapterModel,
    inputs: dict[str, torch.Tensor],
    names: list[Any],
    out: Callable[[Any], torch.Tensor] = operator.attrgetter("logits"),
    masked: bool = True,
) -> tuple[torch.Tensor, float]:
    """Assert each row of the routed batch equals the row run alone (atol 1e-5); (batch `out`, worst diff)."""
    worst = 0.0
    with torch.no_grad():
        mixed = out(model(**inputs, adapters=names))
        for i, name in enumerate(names):
            alone = out(model(**{k: v[i : i + 1] for k, v in inputs.items()}, adapters=name))[0]
            valid = inputs["attention_mask"][i].bool() if masked else slice(None)
            torch.testing.assert_close(mixed[i][valid], alone[valid], atol=1e-5, rtol=0)
            worst = max(worst, (mixed[i][valid] - alone[valid]).abs().max().item())
    return mixed, worst


# the padding side each family's tokenizer uses
PAD = {"bert": "right", "llama": "left", "gpt2": "left"}


def output(out: Any, family: str) -> torch.Tensor:
    """The tensor to compare for a family: hidden states of an encoder, logits of a decoder."""
    return out.last_hidden_state if family == "bert" else out.logits


def minilm_tokenizer() -> PreTrainedTokenizerBase:
    """The real tokenizer of the packaged MiniLM (its vocabulary sizes the tiny BERTs of the text tests)."""
    from transformers import AutoTokenizer

    from adapters_mtl.data.bases import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


# ------------------------------------------------------------------------ synthetic CSV tasks, training
WORDS = "alpha beta gamma delta river stone cloud green quick slow bright dark".split()
# (cue words, labels): a row's label is told by its cue word among random filler words
TOPIC = (["football", "election"], ["sport", "politics"])
MOOD = (["happy", "sad", "angry"], ["pos", "neg", "mad"])


def task_csv(path: Path, n: int, cues: list[str], labels: list[str], seed: int, filler: int) -> str:
    """Write `n` rows ``text,label`` to `path` (`filler` random WORDS and the label's cue, shuffled)."""
    rnd = random.Random(seed)
    lines = ["text,label"]
    for _ in range(n):
        y = rnd.randrange(len(labels))
        words = [rnd.choice(WORDS) for _ in range(filler)] + [cues[y]]
        rnd.shuffle(words)
        lines.append(f"{' '.join(words)},{labels[y]}")
    path.write_text("\n".join(lines))
    return str(path)


def two_tasks(tmp: Path) -> tuple[PreTrainedTokenizerBase, dict[str, TaskData], torch.nn.Module]:
    """(MiniLM tokenizer, {"topic", "mood"} tasks from small CSVs written in `tmp`, a tiny BERT base)."""
    from adapters_mtl.data.tasks import TaskSpec, load_task

    tok = minilm_tokenizer()
    tasks = {
        "topic": load_task(TaskSpec(name="topic", source=task_csv(tmp / "a.csv", 160, *TOPIC, 1, filler=5))),
        "mood": load_task(TaskSpec(name="mood", source=task_csv(tmp / "b.csv", 120, *MOOD, 2, filler=5))),
    }
    base = tiny("bert", vocab_size=tok.vocab_size, max_position_embeddings=64)
    return tok, tasks, base


def task_model(base: torch.nn.Module, tasks: dict[str, TaskData]) -> AdapterModel:
    """A copy of `base` with one LoRA (r 4, query/value) and head per task, seeded."""
    model = AdapterModel(copy.deepcopy(base))
    torch.manual_seed(0)
    for name, data in tasks.items():
        model.add_adapter(name, LoraConfig(r=4, alpha=8, targets=("query", "value")), head=data.head_config())
    return model


def shared_model(base: torch.nn.Module, tasks: dict[str, TaskData]) -> AdapterModel:
    """A copy of `base` with a "shared" LoRA (r 4) and a small LoRA (r 2, value) and head per task, seeded."""
    model = AdapterModel(copy.deepcopy(base))
    torch.manual_seed(0)
    model.add_adapter("shared", LoraConfig(r=4, alpha=8, targets=("query", "value")))
    for name, data in tasks.items():
        model.add_adapter(name, LoraConfig(r=2, alpha=4, targets=("value",)), head=data.head_config())
    return model


def train_config(tmp_path: Path, **kw: Any) -> TrainConfig:
    """A seeded 40-step TrainConfig writing to `tmp_path`/run; `kw` changes any field."""
    from adapters_mtl.training import TrainConfig

    base = dict(steps=40, batch_size=16, lr=3e-2, eval_every=20, seed=0, output_dir=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- serving
def classifier_registry(
    root: Path, labels: list[tuple[str, ...]], prefix_labels: int
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, AdapterRegistry, AdapterModel]:
    """(tiny BERT, MiniLM tokenizer, registry at `root` of classifiers task0.. and "pre", their model)."""
    from adapters_mtl.registry import AdapterRegistry

    tok = minilm_tokenizer()
    base = tiny("bert", vocab_size=tok.vocab_size, max_position_embeddings=64).eval()
    registry = AdapterRegistry(root)
    trainer = AdapterModel(copy.deepcopy(base))
    torch.manual_seed(0)
    for i, names in enumerate(labels):
        cfg = LoraConfig(r=2 + i % 2, targets=LORA_TARGETS["bert"], init="random")
        trainer.add_adapter(f"task{i}", cfg, head=HeadConfig(num_labels=len(names), label_names=names))
        registry.publish(trainer, adapter=f"task{i}", task=f"task{i}")
    trainer.add_adapter("pre", PrefixConfig(num_virtual_tokens=3), head=HeadConfig(num_labels=prefix_labels))
    registry.publish(trainer, adapter="pre", task="pre")
    return base, tok, registry, trainer


def composer(world: tuple[torch.nn.Module, PreTrainedTokenizerBase, AdapterRegistry], **kw: Any) -> Composer:
    """A Composer on a copy of the `world` fixture's (base, tokenizer, registry); `kw` go to Composer."""
    from adapters_mtl.serving.composer import Composer

    base, tok, registry = world
    return Composer(copy.deepcopy(base), registry=registry, tokenizer=tok, **kw)
