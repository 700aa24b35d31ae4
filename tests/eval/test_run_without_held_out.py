"""A run is known by its run.json: with held_out.jsonl removed it still chats and merges, and eval says the held-out
rows are gone and what to pass instead (not "not a run directory")."""

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, train_file) -> Path:
    root = tmp_path_factory.mktemp("lora")
    recipe = {"model": {"name_or_path": str(tiny_model_dir), "gradient_checkpointing": False},
              "data": {"train": str(train_file), "max_length": 64, "eval_fraction": 0.125},
              "method": {"name": "lora", "r": 4},
              "train": {"learning_rate": 1e-3, "max_steps": 1, "batch_size": 4, "output_dir": str(root / "run")}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", str(root / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_run_without_held_out_rows(lora_run, tmp_path, train_file):
    run = Path(shutil.copytree(lora_run, tmp_path / "run"))
    (run / "held_out.jsonl").unlink()

    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{run / 'held_out.jsonl'}: missing" in result.output and "not a run directory" not in result.output
    assert "--data FILE" in result.output and f"--recipe {run / 'recipe.yaml'}" in result.output

    result = runner.invoke(app, ["eval", str(run), "--data", str(train_file), "--max-samples", "2",
                                 "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["chat", str(run)], input="").exit_code == 0
    result = runner.invoke(app, ["merge", str(run), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "config.json").is_file()
