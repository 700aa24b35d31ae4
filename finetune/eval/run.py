"""`finetune eval`: which evaluation a target gets (rewards and answer accuracy for runs that learned from
rewards, preference scores for pairs and labelled answers, SFT scores for conversations), on the rows the run held
out or the ones given."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError
from finetune.eval.preference import held_out_pairs, run_preference_eval
from finetune.eval.rewards import held_out_prompts, reward_recipe, run_reward_eval
from finetune.eval.sft import held_out_rows, no_held_out, run_sft_eval
from finetune.eval.targets import resolve_target


def run_eval(target: str, recipe: Path | None = None, data: Path | None = None, compare_base: bool = False,
             max_samples: int | None = None, max_new_tokens: int = 64, batch_size: int = 8,
             output: Path | None = None, log=print) -> dict:
    """Evaluate a run or model (and optionally its base) on the same rows; write eval.json and eval.md."""
    if recipe is None and data is None and not (Path(target) / "held_out.jsonl").is_file():
        raise UserError(no_held_out(target))  # before a GGUF is converted or a model loaded
    where = resolve_target(target, output)
    if recipe is not None:
        from finetune.recipe.load import load_recipe

        where.fold_system = load_recipe(recipe).data.fold_system
    from finetune.models.vision import is_vision_language

    if is_vision_language(where.model_path):  # image questions, through the model's processor
        from finetune.eval.vision import held_out_image_rows, run_vision_eval

        rows = held_out_image_rows(target, recipe, data)[:max_samples]
        return run_vision_eval(target, where, rows, compare_base, max_new_tokens, log)
    rewarded = reward_recipe(target, recipe)  # a run that learned from rewards is scored by them
    if rewarded is not None:
        rows = held_out_prompts(target, rewarded, recipe, data)[:max_samples]
        return run_reward_eval(target, where, rewarded, rows, compare_base, batch_size, log)
    pairs = held_out_pairs(target, recipe, data)
    if pairs is not None:
        return run_preference_eval(target, where, pairs[:max_samples], batch_size, recipe, log)
    rows = held_out_rows(target, recipe, data)[:max_samples]
    return run_sft_eval(target, where, rows, compare_base, max_new_tokens, batch_size, log, recipe)
