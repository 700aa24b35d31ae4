"""Shared fixtures: a tiny Llama and a byte-level BPE tokenizer built locally (no download anywhere)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from benchmarks.tiny import build_tiny_llama, build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "fixtures"


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


@pytest.fixture(scope="session")
def embedded_demo_run(tmp_path_factory) -> Path:
    """recipes/demo.yaml trained 4 steps on the embedded SmolLM2 (16 of its held-out rows), once for the tests that
    evaluate, merge and export it (each takes a copy: the run directory is theirs to write into)."""
    from typer.testing import CliRunner

    from finetune.cli import app

    run = tmp_path_factory.mktemp("embedded-demo") / "demo"
    root, here = Path(__file__).resolve().parent.parent, Path.cwd()
    # The tests score at most 8 held-out rows: the first 16 of the demo's 200 keep the run's final evaluation short.
    held_out = run.parent / "test.jsonl"
    held_out.write_text("".join((root / "data" / "demo" / "test.jsonl").read_text().splitlines(keepends=True)[:16]))
    os.chdir(root)  # the recipe names its data relative to the repo root
    try:
        result = CliRunner().invoke(app, ["train", "recipes/demo.yaml", "--output", str(run),
                                          "--set", "train.max_steps=4", "--set", "train.logging_steps=1",
                                          "--set", "train.warmup_ratio=0", "--set", f"data.eval={held_out}"])
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def demo_run(embedded_demo_run, tmp_path) -> Path:
    """A copy of the shared embedded demo run for one test."""
    import shutil

    return Path(shutil.copytree(embedded_demo_run, tmp_path / "demo"))
