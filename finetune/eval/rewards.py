"""`finetune eval` on a run that learned from rewards (objective grpo): one greedy completion per held-out prompt,
scored by the run's own reward functions (mean per function and weighted), and, for every `exact_answer` reward,
the strict and lenient answer accuracy side by side: a gain in strict alone is format compliance, a gain in
lenient is answers the model did not know before.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from finetune.data.prompts import ORIGIN, PromptRow, read_prompts, read_saved_prompts, rendered_prompt
from finetune.data.rows import Conversation, split_held_out
from finetune.data.sources import row_name
from finetune.errors import UserError
from finetune.eval.sft import SAMPLES_SHOWN, generate
from finetune.eval.targets import Target, eval_template, score_candidates, write_report


def reward_recipe(target: str, recipe_path: Path | None):
    """The recipe whose rewards score the run: --recipe, else the run's own resolved recipe; None when it does not
    train on rewards."""
    from finetune.recipe.load import load_recipe

    path = recipe_path or Path(target) / "recipe.yaml"
    if not path.is_file():
        return None
    recipe = load_recipe(path)
    return recipe if recipe.objective.data_kind == "prompts" else None


def held_out_prompts(target: str, recipe, recipe_path: Path | None, data: Path | None) -> list[PromptRow]:
    """The prompts to score: --data, the recipe's held-out draw (--recipe), or the ones the run saved."""
    if data is not None:
        rows, problems, _, _ = read_prompts(str(data), "test")
        if problems:
            raise UserError(f"{data}: {len(problems)} rows refused, e.g. {problems[0]}")
        return rows
    if recipe_path is not None:
        d, source = recipe.data, recipe.data.train_sources()[0]
        if d.eval is not None:
            return read_prompts(d.eval, d.eval_split)[0]
        rows = read_prompts(source.path, source.split, source.columns)[0]
        return split_held_out(rows, d.eval_fraction, recipe.train.seed)[1]  # the draw training made
    rows = read_saved_prompts(Path(target) / "held_out.jsonl")
    if not rows:
        raise UserError(f"{Path(target) / 'held_out.jsonl'}: the run held out no prompts; pass --data FILE")
    return rows


def score_completions(rewards, specs, rows: list[PromptRow], prompts: list[str], completions: list[str],
                      tokenizer) -> dict:
    """Each reward's mean (None values: not scored, left out), the weighted sum's mean and the answer accuracies. The
    rewards get what they got in training: the rendered prompts, the completions, the rows' columns."""
    from finetune.rewards import score_answer

    columns = sorted({k for r in rows for k in r.columns})
    kwargs = {k: [r.columns.get(k) for r in rows] for k in columns}
    kwargs[ORIGIN] = [row_name(r.source, r.row) for r in rows]
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    metrics, total = {}, [0.0] * len(rows)
    for reward in rewards:
        values = reward(prompts=prompts, completions=completions, completion_ids=ids, trainer_state=None,
                        log_extra=lambda *a: None, log_metric=lambda *a: None, **kwargs)
        scored = [v for v in values if v is not None]
        metrics[f"reward/{reward.name}"] = sum(scored) / len(scored) if scored else None
        total = [t + reward.weight * (v or 0.0) for t, v in zip(total, values)]
    metrics["reward"] = sum(total) / len(total)
    answers = [(s, r) for s, r in zip(specs, rewards) if s.fn == "exact_answer"]
    for number, (spec, reward) in enumerate(answers):
        options = spec.options
        column = options.get("column", "answer")
        judged = [score_answer(c, r.columns.get(column), options.get("extract", "last_number"),
                               options.get("pattern")) for c, r in zip(completions, rows)]
        suffix = "" if number == 0 else f"/{reward.name}"  # the first exact_answer reward is the run's answer
        metrics[f"strict_accuracy{suffix}"] = sum(s for s, _ in judged) / len(judged)
        metrics[f"lenient_accuracy{suffix}"] = sum(lenient for _, lenient in judged) / len(judged)
    metrics["rows"] = len(rows)
    return metrics


def run_reward_eval(target: str, where: Target, recipe, rows: list[PromptRow], compare_base: bool,
                    batch_size: int, log=print) -> dict:
    """Greedy completions of the model (and, with compare_base, its base) to the same prompts, scored by the
    recipe's rewards; writes eval.json and eval.md."""
    from rich.markup import escape

    from finetune.rewards import build_rewards

    if compare_base and where.base_path is None:
        raise UserError("--compare-base needs a run directory (its run.json names the base model)")
    if not rows:
        raise UserError(f"{target}: no held-out prompts to score")
    specs = recipe.objective.rewards
    rewards = build_rewards(specs, Path.cwd())
    max_new_tokens = recipe.objective.max_completion_length  # what the policy was allowed during training
    pending = [Conversation(r.prompt + [{"role": "assistant", "content": ""}], r.source, r.row, r.tools)
               for r in rows]

    def score(name, model, tokenizer, progress):
        task = progress.add_task(f"eval {name}", total=len(rows))
        template = eval_template(tokenizer, where.fold_system)
        completions = generate(model, tokenizer, pending, batch_size, max_new_tokens, partial(progress.advance, task),
                               template)
        prompts = [rendered_prompt(tokenizer, template, r) for r in rows]
        return score_completions(rewards, specs, rows, prompts, completions, tokenizer), completions

    scored = score_candidates(where, compare_base, score)
    results = {name: metrics for name, (metrics, _) in scored.items()}
    samples = [{"prompt": r.prompt[-1]["content"], "columns": r.columns,
                **{name: completions[i] for name, (_, completions) in scored.items()}} for i, r in enumerate(rows)]
    for sample in samples[:SAMPLES_SHOWN]:
        log(f"[dim]prompt:[/dim] {escape(sample['prompt'])}")
        for name in scored:
            log(f"[dim]{name}:[/dim] {escape(sample[name])}")
    keys = [k for k in next(iter(results.values())) if k != "rows"] + ["rows"]
    report = {"target": target, "rows": len(rows), "objective": recipe.objective.name, "results": results,
              "samples": samples}
    return write_report(target, where, report, keys, log)
