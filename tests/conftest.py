"""Shared fixtures: a tiny Llama and a byte-level BPE tokenizer built locally (no download anywhere)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Count up from a number: one two three four five six seven eight nine ten.",
    "Question: what comes after 3? Answer: 4, then 5 and 6.",
    "user assistant system You are a helpful assistant.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
] * 20


def build_tokenizer(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>")


def build_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 Llama with a ChatML-ready tokenizer, saved as a normal model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    build_tiny_llama(len(tokenizer)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny4_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with 4 decoder layers (LISA needs layers to choose from)."""
    path = tmp_path_factory.mktemp("tiny-llama-4")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    build_tiny_llama(len(tokenizer), layers=4).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def counting_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: continue a count. Deterministic for a seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randint(0, 15)
        rows.append({"messages": [
            {"role": "user", "content": f"Count from {start}"},
            {"role": "assistant", "content": " ".join(str(start + i) for i in range(5))},
        ]})
    return rows


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "count.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in counting_rows(32)))
    return path


@pytest.fixture
def write_recipe(tmp_path, tiny_model_dir, train_file):
    """Write a recipe for the tiny model; `sections` override/extend the defaults (section by section)."""

    def write(name="recipe.yaml", **sections):
        recipe = {
            "model": {"name_or_path": str(tiny_model_dir), "gradient_checkpointing": False},
            "data": {"train": str(train_file), "max_length": 64},
            "method": {"name": "full"},
            "train": {"learning_rate": 1e-3, "max_steps": 6, "batch_size": 4, "logging_steps": 1,
                      "warmup_ratio": 0.0, "lr_scheduler": "constant", "output_dir": str(tmp_path / "run")},
        }
        for section, values in sections.items():
            recipe[section] = values if section == "method" else {**recipe.get(section, {}), **values}
        path = tmp_path / name
        import yaml

        path.write_text(yaml.safe_dump(recipe))
        return path

    return write
