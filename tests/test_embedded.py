"""End-to-end on the embedded SmolLM2-135M-Instruct: recipes/demo.yaml for a few steps, eval, merge.

`make test` fetches and converts the model first (`finetune pull`), so these run in CI; elsewhere they skip
with the reason shown.
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.paths import cache_dir
from finetune.run.report import read_metrics

ROOT = Path(__file__).resolve().parent.parent
MODEL = cache_dir() / "models" / "smollm2-135m-instruct"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "config.json").exists(),
                       reason=f"embedded SmolLM2 not cached at {MODEL}; run `make model` (or `finetune pull`)"),
]
runner = CliRunner()


def test_converted_checkpoint_is_a_plain_trainable_model():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # the GGUF marker that blocks training is gone
    assert (MODEL / "model.safetensors").exists()


def test_demo_recipe_trains_evaluates_and_merges(demo_run, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = demo_run  # recipes/demo.yaml, 4 steps (conftest.embedded_demo_run)
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    result = runner.invoke(app, ["eval", str(run), "--compare-base", "--max-samples", "8",
                                 "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    results = json.loads((run / "eval.json").read_text())["results"]
    assert results["base"]["rows"] == results["tuned"]["rows"] == 8
    assert results["tuned"]["loss"] < results["base"]["loss"]
    result = runner.invoke(app, ["merge", str(run), "--output", str(run / "merged"), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "merged" / "merge.json").read_text())["max_logit_diff"] < 1e-3
