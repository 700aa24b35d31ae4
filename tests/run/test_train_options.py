"""Training options passed through to transformers: trackers, NEFTune, early stopping, an evaluation at step 0.
Each reaches the built trainer and trains on the tiny model."""

import json

import pytest

from finetune.errors import UserError
from finetune.recipe.load import load_recipe
from finetune.run.flow import Hooks, run_training
from finetune.run.report import read_metrics


def test_tensorboard_events_land_in_the_run_dir_with_the_run_name_and_recipe(write_recipe, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = write_recipe(train={"report_to": ["tensorboard"], "max_steps": 3})
    seen = {}

    def on_trainer(trainer, method):
        seen.update(report_to=trainer.args.report_to, run_name=trainer.args.run_name)

    run_dir = run_training(load_recipe(path), path, log=lambda *_: None, hooks=Hooks(on_trainer=on_trainer))
    assert seen == {"report_to": ["tensorboard"], "run_name": run_dir.name}
    [events] = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent), size_guidance={"tensors": 0}).Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 3]
    recipe_text = accumulator.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "early_stopping_patience" in recipe_text and str(run_dir) in recipe_text


def test_no_tracker_by_default_and_a_missing_one_is_named(write_recipe):
    assert load_recipe(write_recipe()).train.report_to == []
    with pytest.raises(UserError, match=r"train.report_to: wandb not installed; pip install wandb"):
        load_recipe(write_recipe(train={"report_to": ["wandb"]}))
    with pytest.raises(UserError, match=r"train.report_to.0: Input should be 'tensorboard', 'wandb'"):
        load_recipe(write_recipe(train={"report_to": ["tensorbored"]}))


def test_neftune_noise_is_on_while_training(write_recipe):
    path = write_recipe(train={"neftune_noise_alpha": 5.0, "max_steps": 2})
    seen = {}

    def on_trainer(trainer, method):
        from transformers import TrainerCallback

        class Watch(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                embeddings = model.get_input_embeddings()
                seen.update(alpha=getattr(embeddings, "neftune_noise_alpha", None),
                            hooks=len(embeddings._forward_hooks))

        trainer.add_callback(Watch())

    run_training(load_recipe(path), path, log=lambda *_: None, hooks=Hooks(on_trainer=on_trainer))
    assert seen == {"alpha": 5.0, "hooks": 1}


def test_early_stopping_stops_and_ends_on_the_best_checkpoint(write_recipe, tmp_path):
    # A learning rate this small leaves the held-out loss where it is: it never improves on the first evaluation.
    path = write_recipe(data={"eval_fraction": 0.125},
                        train={"learning_rate": 1e-12, "max_steps": 20, "eval_steps": 1, "save_steps": 1,
                               "early_stopping_patience": 2, "save_total_limit": 5})
    lines = []
    run_dir = run_training(load_recipe(path), path, log=lines.append)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["steps"] == 3  # step 1 is the best, 2 and 3 do not improve on it
    assert any("early stopping: the best held-out loss" in str(line) and "checkpoint-1" in str(line)
               for line in lines)


def test_eval_on_start_gives_a_step_0_point(write_recipe):
    path = write_recipe(data={"eval_fraction": 0.125}, train={"eval_on_start": True, "max_steps": 2})
    run_dir = run_training(load_recipe(path), path, log=lambda *_: None)
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert evals[0]["step"] == 0 and len(evals) == 2  # at the start, and the final evaluation


def test_early_stopping_and_eval_on_start_refuse_recipes_they_cannot_honour(write_recipe):
    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(train={"early_stopping_patience": 2, "eval_on_start": True}))
    text = " ".join(str(err.value).split())
    assert "need held-out data" in text and "needs `train.eval_steps`" in text
    with pytest.raises(UserError, match=r"train.save_steps \(5\) must be a multiple of train.eval_steps \(2\)"):
        load_recipe(write_recipe(data={"eval_fraction": 0.1},
                                 train={"early_stopping_patience": 2, "eval_steps": 2, "save_steps": 5}))
