"""The rewards tried before training (`finetune validate`, and the start of a run): each one called on the first rows
with a few made-up completions, exactly as TRL's GRPOTrainer will call it, so a missing column, a function that
raises or returns the wrong thing stops the run in seconds rather than after the model has loaded and generated."""

from __future__ import annotations

from finetune.errors import UserError
from finetune.rewards.base import PASSED_BY_TRAINER
from finetune.rewards.load import Reward

#: The rows tried: enough to meet a second row's values, few enough to stay instant with slow user functions.
ROWS = 4
#: The columns TRL keeps out of a reward's keyword arguments (it passes them as prompts, completions, completion_ids).
NOT_PASSED = ("prompt", "completion", "completion_ids")


def probe(rewards: list[Reward], rows: list[dict], sample_completions: list[str] | None = None) -> None:
    """Call every reward on up to the first 4 rows; one UserError listing every problem found."""
    rows = rows[:ROWS]
    if not rows or not rewards:
        return
    prompts, completions, kwargs = _batch(rows, sample_completions)
    columns = [key for key in kwargs if key not in PASSED_BY_TRAINER]
    problems = []
    for reward in rewards:
        found = _column_problems(reward, columns)
        if not found:  # a reward missing its column would only raise about it again
            try:
                reward(prompts, completions, **kwargs)
            except UserError as err:
                found.append(str(err))
        problems += found
    if problems:
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        raise UserError(f"rewards tried on the first {len(rows)} row{'s' if len(rows) > 1 else ''}: {count}:\n"
                        + "\n".join(f"  - {p}" for p in problems))


def _batch(rows: list[dict], sample_completions: list[str] | None) -> tuple[list, list, dict]:
    """Prompts, completions and keyword arguments as TRL builds them: each row's columns repeated once per completion,
    plus TRL's own arguments (fake token ids, one per character; no trainer state; logging that does nothing)."""
    keys = [key for key in rows[0] if key not in NOT_PASSED]  # TRL reads the first row's keys too
    prompts, completions, kwargs = [], [], {key: [] for key in keys}
    kwargs.setdefault("source_row", [])
    for i, row in enumerate(rows):
        samples = sample_completions if sample_completions is not None else _samples(row)
        for sample in samples:
            prompts.append(str(row.get("prompt", "")))
            completions.append(sample)
            for key in keys:
                kwargs[key].append(row.get(key))
            if "source_row" not in keys:
                kwargs["source_row"].append(f"row {i}")
    kwargs.update(completion_ids=[[ord(c) % 50000 for c in text] for text in completions], trainer_state=None,
                  log_extra=lambda column, values: None, log_metric=lambda name, value: None)
    return prompts, completions, kwargs


def _samples(row: dict) -> list[str]:
    """An empty completion (what a model cut at its first token gives), "42", and one made of a short column value
    of the row (its reference answer, most often), so an answer-checking reward meets a right answer too."""
    short = next((str(value) for key, value in row.items() if key not in (*NOT_PASSED, "source_row")
                  and isinstance(value, (str, int, float)) and not isinstance(value, bool) and len(str(value)) <= 200),
                 "The answer is 42.")
    return ["", "42", short]


def _column_problems(reward: Reward, columns: list[str]) -> list[str]:
    have = ", ".join(columns) or "none"
    problems = []
    for column, option in reward.columns.items():
        if column in columns:
            continue
        if option is None:
            problems.append(f"reward `{reward.spec.fn}`: parameter `{column}` has no default and is neither an option "
                            f"of this reward nor a column of the rows (their columns: {have}); give it a default, set "
                            "it as an option under the reward, or add the column to the data")
        else:
            problems.append(f"reward `{reward.spec.fn}`: the rows have no column `{column}` (their columns: {have}); "
                            f"set the reward's `{option}` to the column that holds it")
    if not reward.spec.is_builtin:
        for option in reward.spec.options:
            if option in columns:
                problems.append(f"reward `{reward.spec.fn}`: option `{option}` is also a column of the rows, and TRL "
                                "passes the column, which would replace the option; rename one of them")
    return problems
