"""Every shipped recipe that can run on this CPU trains for 2 steps as shipped (only length, held-out rows, a batch
beyond 4 rows, accumulation beyond 2 micro-batches, GRPO's completions per step and output overridden; demo.yaml's
run, 4 steps, is the one the embedded tests share), so a recipe that validates but cannot train (a method option, a
data path, a strategy) fails here."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from finetune.cli import app
from finetune.paths import cache_dir
from finetune.run.report import read_metrics

ROOT = Path(__file__).resolve().parent.parent
MODEL = cache_dir() / "models" / "smollm2-135m-instruct"


def runs_on_cpu(path: Path) -> bool:
    """The recipes on the embedded model; the 7B ones need the hub and a GPU (validated in test_recipe.py)."""
    raw = yaml.safe_load(path.read_text())
    return raw.get("model", {}).get("name_or_path", "smollm2-135m-instruct") == "smollm2-135m-instruct"


CPU_RECIPES = [p for p in sorted((ROOT / "recipes").glob("*.yaml")) if runs_on_cpu(p)]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "config.json").exists(),
                       reason=f"embedded SmolLM2 not cached at {MODEL}; run `make model` (or `finetune pull`)"),
]


def test_the_cpu_recipes_are_the_ones_on_the_embedded_model():
    assert {p.name for p in CPU_RECIPES} >= {"demo.yaml", "lora.yaml", "full.yaml", "galore.yaml", "lisa.yaml",
                                             "ddp.yaml", "accumulation.yaml"}


@pytest.mark.parametrize("recipe", CPU_RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_trains_two_steps(recipe, tmp_path, monkeypatch, request):
    monkeypatch.chdir(ROOT)  # recipes name their data relative to the repo root
    raw = yaml.safe_load(recipe.read_text())
    if recipe.name == "demo.yaml":  # the embedded tests' shared run is this recipe as shipped, for 4 steps
        run, steps = request.getfixturevalue("embedded_demo_run"), [1, 2, 3, 4]
    else:
        overrides = ["train.max_steps=2", "train.logging_steps=1"]
        if raw.get("train", {}).get("gradient_accumulation_steps", 1) > 2:  # still accumulating, in an eighth the time
            overrides.append("train.gradient_accumulation_steps=2")
        objective = raw.get("objective", {})
        if objective.get("name") == "grpo":  # one prompt's group per micro-batch, shorter: still whole groups
            overrides += [f"train.batch_size={objective.get('num_generations', 8)}",
                          "objective.max_completion_length=8"]
        elif raw.get("train", {}).get("batch_size", 1) > 4:  # what trains is the same, in half the time or less
            overrides.append("train.batch_size=4")
        if raw["data"].get("eval_fraction"):
            overrides.append("data.eval_fraction=0.01")  # a short final evaluation
        run, steps = tmp_path / recipe.stem, [1, 2]
        args = ["train", str(recipe.relative_to(ROOT)), "--output", str(run)]
        result = CliRunner().invoke(app, args + [a for o in overrides for a in ("--set", o)])
        assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == steps
    weights = run / ("adapter" if raw["method"]["name"] == "lora" else "model")
    assert weights.is_dir()
    # The card and the adapter name the base by the embedded alias's hub id, not this machine's cache path.
    card = (weights / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert f"| method | {raw['method']['name']}" in card and "finetune train" in card
    if raw["method"]["name"] == "lora":
        config = json.loads((weights / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
