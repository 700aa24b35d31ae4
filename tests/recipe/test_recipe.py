"""The recipe schema: strict keys with suggestions, every problem in one error, overrides, shipped recipes."""

from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from finetune.methods import METHODS
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import MethodOptions, Recipe

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


def write(tmp_path, recipe: dict, name="r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def good(train_file):
    return {"data": {"train": str(train_file)}, "method": {"name": "lora"}}


def problems_of(path, overrides=()) -> str:
    with pytest.raises(UserError) as err:
        load_recipe(path, list(overrides))
    return str(err.value)


def test_valid_recipe_fills_defaults(tmp_path, good):
    recipe = load_recipe(write(tmp_path, good))
    assert recipe.method.name == "lora" and recipe.method.r == 8 and recipe.method.alpha == 32
    assert recipe.model.name_or_path == "smollm2-135m-instruct"
    assert recipe.train.gradient_accumulation_steps == 1


def test_unknown_keys_suggest_the_nearest(tmp_path, good):
    good["train"] = {"learning_rat": 1e-4}
    good["model"] = {"dtyp": "bf16"}
    good["trian"] = {}
    message = problems_of(write(tmp_path, good))
    assert "train.learning_rat: unknown key; did you mean `learning_rate`?" in message
    assert "model.dtyp: unknown key; did you mean `dtype`?" in message
    assert "trian: unknown key; did you mean `train`?" in message
    assert "3 problems" in message


def test_every_problem_is_reported_at_once(tmp_path, good):
    good["model"] = {"name_or_path": "./no/such/model"}
    good["data"]["train"] = "missing.jsonl"
    good["method"] = {"name": "lora", "r": 0}
    good["train"] = {"learning_rate": 0, "batch_size": 0, "epochs": "many"}
    message = problems_of(write(tmp_path, good))
    for expected in (
        "model.name_or_path: model path `./no/such/model` does not exist",
        "data.train: data file `missing.jsonl` does not exist",
        "method.r: Input should be greater than 0 (got 0)",
        "train.learning_rate: Input should be greater than 0 (got 0)",
        "train.batch_size: Input should be greater than or equal to 1 (got 0)",
        "train.epochs: Input should be a valid number",
    ):
        assert expected in message
    assert "6 problems" in message


def test_method_name_is_a_discriminated_union(tmp_path, good):
    good["method"] = {"name": "lorra", "r": 4}
    assert "method.name: unknown method `lorra`; did you mean `lora`?" in problems_of(write(tmp_path, good))
    good["method"] = {"name": "full", "r": 4}  # r belongs to lora, not full
    assert "method.r: unknown key" in problems_of(write(tmp_path, good))
    good["method"] = {"r": 4}
    assert "method.name: missing" in problems_of(write(tmp_path, good))


def test_cross_field_checks(tmp_path, good, train_file):
    good["data"].update(eval=str(train_file), eval_fraction=0.1)
    assert "set either `data.eval` or `data.eval_fraction`, not both" in problems_of(write(tmp_path, good))
    del good["data"]["eval"], good["data"]["eval_fraction"]
    good["train"] = {"eval_steps": 10}
    assert "`train.eval_steps` is set but there is no held-out data" in problems_of(write(tmp_path, good))


def test_set_overrides_are_typed_and_validated(tmp_path, good):
    path = write(tmp_path, good)
    recipe = load_recipe(path, ["train.learning_rate=3e-4", "method.target_modules=[q_proj, v_proj]"])
    assert recipe.train.learning_rate == pytest.approx(3e-4)
    assert recipe.method.target_modules == ["q_proj", "v_proj"]
    message = problems_of(path, ["train.batch_size=0", "train.nope=1", "no-equals-sign"])
    assert "train.batch_size: Input should be greater than or equal to 1" in message
    assert "train.nope: unknown key" in message
    assert "--set 'no-equals-sign': expected dotted.key=value" in message
    # the speed options: typed, and a near miss gets the suggestion
    assert load_recipe(path, ["train.token_metrics=true", "train.packing=true"]).train.token_metrics is True
    message = problems_of(path, ["train.token_metrics=maybe", "train.token_metric=true"])
    assert "train.token_metrics: Input should be a valid boolean" in message
    assert "train.token_metric: unknown key; did you mean `token_metrics`?" in message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  train: [unclosed\nmethod: {name: full}\n")
    message = problems_of(path)
    assert str(path) in message and "not valid YAML at line" in message


def test_registry_and_schema_name_the_same_methods():
    union_names = {option.model_fields["name"].default for option in MethodOptions.__origin__.__args__}
    assert union_names == set(METHODS)
    assert Recipe.model_fields["method"].discriminator == "name"


def test_field_docstrings_are_the_documentation():
    from finetune.recipe.schema import TrainSection

    assert "Micro-batches per optimizer step" in TrainSection.model_fields["gradient_accumulation_steps"].description


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates_and_says_how_to_run_it(path, monkeypatch):
    monkeypatch.chdir(path.parent.parent)  # recipes name data relative to the repo root
    load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("finetune train" in first or "accelerate launch" in first)


@pytest.mark.slow  # spawns a process
def test_validation_loads_no_ml_stack():
    """`finetune validate` checks recipes in a blink: the schema and registry import neither torch nor transformers."""
    import subprocess
    import sys

    code = ("import sys, finetune.recipe.schema, finetune.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'bitsandbytes') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_galore_and_lisa_options_are_validated(tmp_path, good):
    good["method"] = {"name": "galore", "rank": 0, "proj_type": "diagonal", "optim_bits": 16, "svd": "fast",
                      "update_proj_gap": 0}
    message = problems_of(write(tmp_path, good))
    for expected in ("method.rank: Input should be greater than 0 (got 0)",
                     "method.proj_type: Input should be 'std', 'reverse_std', 'left', 'right' or 'full'",
                     "method.optim_bits: Input should be 8 or 32 (got 16)",
                     "method.svd: Input should be 'full' or 'randomized' (got 'fast')",
                     "method.update_proj_gap: Input should be greater than or equal to 1 (got 0)"):
        assert expected in message
    good["method"] = {"name": "lisa", "activated_layers": 0, "interval_steps": 0, "always_active": "3"}
    message = problems_of(write(tmp_path, good))
    assert "method.activated_layers: Input should be greater than or equal to 1" in message
    assert "method.interval_steps: Input should be greater than or equal to 1" in message
    assert "method.always_active: Input should be a valid list" in message


def test_image_pixel_bounds_are_validated(tmp_path, good):
    good["data"].update(image_max_pixels=10_000, image_min_pixels=20_000)
    assert "data.image_min_pixels 20000 is above data.image_max_pixels 10000" in problems_of(write(tmp_path, good))
    good["data"].update(image_max_pixels=100, image_min_pixels=None)  # below one 28x28 patch
    assert "image_max_pixels" in problems_of(write(tmp_path, good))
    good["data"].update(image_max_pixels=10_000, image_min_pixels=2_500)
    loaded = load_recipe(write(tmp_path, good))
    assert (loaded.data.image_max_pixels, loaded.data.image_min_pixels) == (10_000, 2_500)
