"""Runs of a recipe as tests need them: the production trainer built and inspected before it trains, and the
same recipe trained straight through against halfway, stopped and resumed."""

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe.load import load_recipe
from finetune.run.flow import Hooks, run_training

#: Each method with options small enough for the tiny model.
EVERY_METHOD = [
    {"name": "full"},
    {"name": "lora", "r": 4},
    {"name": "galore", "rank": 8, "update_proj_gap": 2},
    {"name": "lisa", "activated_layers": 1, "interval_steps": 2},
]


class Captured(Exception):
    """Stops run_training once the trainer is built and inspected."""


def built_trainer(path, inspect):
    """Build the production trainer for a recipe, hand it to `inspect`, and stop before training."""
    def on_trainer(trainer, method):
        inspect(trainer)
        raise Captured

    with pytest.raises(Captured):
        run_training(load_recipe(path), path, log=lambda *_: None, hooks=Hooks(on_trainer=on_trainer))


def straight_and_resumed(write, tmp_path, steps: int = 4):
    """Run dirs (straight, resumed) of the recipe `write(name=..., train=...)` makes: `steps` steps in one go, and
    `steps // 2` steps then `--resume` to `steps`, from the checkpoint at the half."""
    half = steps // 2
    straight = write(train={"max_steps": steps, "save_steps": half, "output_dir": str(tmp_path / "straight")})
    run_training(load_recipe(straight), straight, log=lambda *_: None)
    halves = write(name="halves.yaml", train={"max_steps": half, "save_steps": half,
                                              "output_dir": str(tmp_path / "halves")})
    run_training(load_recipe(halves), halves, log=lambda *_: None)
    longer = [f"train.max_steps={steps}"]
    run_training(load_recipe(halves, longer), halves, resume=True, log=lambda *_: None, overrides=longer)
    return tmp_path / "straight", tmp_path / "halves"


def assert_same_weights(a_dir, b_dir) -> None:
    """The two full checkpoints hold bit-identical weights."""
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
