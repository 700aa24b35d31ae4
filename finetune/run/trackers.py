"""Experiment trackers (`train.report_to`): transformers' own integrations, set up to work offline and to receive the
run's name and resolved recipe, which transformers does not send (it logs the TrainingArguments and model config)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from transformers import TrainerCallback

#: The variables finetune set for an earlier run in this process: replaced for the next run, where a user's own
#: value is kept.
_SET: dict[str, str] = {}


def _default(name: str, value: str) -> None:
    if name not in os.environ or os.environ[name] == _SET.get(name):
        os.environ[name] = _SET[name] = value


def tracker_args(report_to: list[str], run_dir: Path) -> dict:
    """TrainingArguments for the trackers: every one's files in the run dir, offline unless the user's own settings
    say otherwise (a W&B key or mode, an MLflow tracking URI), the run named after its directory."""
    if not report_to:
        return {"report_to": "none"}
    run_dir = Path(run_dir).resolve()
    if "wandb" in report_to:
        _default("WANDB_DIR", str(run_dir))
        if "WANDB_API_KEY" not in os.environ:
            _default("WANDB_MODE", "offline")  # `wandb sync` uploads the run later
    if "mlflow" in report_to:
        _default("MLFLOW_TRACKING_URI", (run_dir / "mlruns").as_uri())
    if "trackio" in report_to:
        _default("TRACKIO_DIR", str(run_dir / "trackio"))
    # transformers 5's TensorBoard callback takes its directory from this variable (else one under output_dir).
    _default("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    return {"report_to": list(report_to), "run_name": run_dir.name}


class RecipeToTrackers(TrainerCallback):
    """Sends the resolved recipe to each tracker as the run starts: what reproduces the run, beside its curves."""

    def __init__(self, recipe: dict, trainer):
        self.text = yaml.safe_dump(recipe, sort_keys=False)
        self.recipe = recipe
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from transformers.integrations import (
            MLflowCallback,
            TensorBoardCallback,
            WandbCallback,
        )

        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
                callback.tb_writer.add_text("recipe", f"```yaml\n{self.text}```")
                callback.tb_writer.flush()
            elif isinstance(callback, WandbCallback) and getattr(callback, "_wandb", None) is not None \
                    and callback._wandb.run is not None:
                callback._wandb.config.update({"recipe": self.recipe}, allow_val_change=True)
            elif isinstance(callback, MLflowCallback) and getattr(callback, "_ml_flow", None) is not None:
                callback._ml_flow.log_text(self.text, "recipe.yaml")
