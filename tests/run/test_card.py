"""Model cards in saved directories: metadata a hub upload reads, what made the weights, and the evaluation."""

import json

import yaml
from typer.testing import CliRunner

from finetune.cli import app
from finetune.models.registry import resolvable_base
from finetune.recipe.load import load_recipe
from finetune.run.flow import run_training

runner = CliRunner()


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_adapter_card_names_base_method_data_and_gets_the_evaluation(write_recipe, tiny_model_dir, train_file):
    path = write_recipe(method={"name": "lora", "r": 4}, data={"eval_fraction": 0.125}, train={"max_steps": 2})
    run_dir = run_training(load_recipe(path), path, log=lambda *_: None)
    card = (run_dir / "adapter" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == str(tiny_model_dir) and meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation" and {"finetune", "lora", "sft"} <= set(meta["tags"])
    assert "| method | lora (r=4" in card and f"`{train_file}`: 28 rows" in card and "| steps | 2 |" in card
    assert "final train loss" in card and "final eval loss" in card
    assert f"finetune train {run_dir / 'recipe.yaml'}" in card
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)  # as the recipe names it
    assert "## Evaluation" not in card
    assert runner.invoke(app, ["eval", str(run_dir), "--max-new-tokens", "4"]).exit_code == 0
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "## Evaluation" in card and "| tuned |" in card
    merged = run_dir / "merged"
    assert runner.invoke(app, ["merge", str(run_dir), "--output", str(merged)]).exit_code == 0
    meta = front_matter((merged / "README.md").read_text())
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]


def test_full_model_card_and_the_embedded_alias_resolves_to_its_hub_id(write_recipe):
    path = write_recipe(train={"max_steps": 1})
    run_dir = run_training(load_recipe(path), path, log=lambda *_: None)
    assert front_matter((run_dir / "model" / "README.md").read_text())["library_name"] == "transformers"
    assert resolvable_base("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolvable_base("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
