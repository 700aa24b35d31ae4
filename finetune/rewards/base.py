"""What the built-in rewards share: their options' base class, the problem a reward finds in one row, and reading a
row's column out of TRL's keyword arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finetune.recipe.section import Section

#: TRL's reward signature: `fn(prompts, completions, **row_columns) -> one float (or None) per completion`.
RewardFn = Callable[..., list]

#: The keyword arguments TRL (and finetune's GRPO data) pass to every reward besides the row's own columns; an option
#: of the same name would collide with them.
PASSED_BY_TRAINER = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                     "environments", "source_row")


class RewardOptions(Section):
    """A built-in reward's options: the keys of its recipe entry besides `fn` and `weight`."""

    def columns(self) -> dict[str, str]:
        """The row columns the reward reads, each with the option that names it (for the start check's message)."""
        return {}


class RowProblem(Exception):
    """Something a built-in cannot score in one row (a missing column, a schema that does not parse). The reward's
    wrapper (finetune.rewards.load.Reward) turns it into a UserError that names the reward and the row."""

    def __init__(self, message: str, index: int = 0):
        super().__init__(message)
        self.index = index


def column(kwargs: dict[str, Any], name: str, option: str) -> list:
    """The values of the row column `name`, one per completion, or a RowProblem saying which columns there are."""
    if name not in kwargs:
        have = ", ".join(sorted(k for k in kwargs if k not in PASSED_BY_TRAINER)) or "none"
        raise RowProblem(f"the rows have no column `{name}` (their columns: {have}); set the reward's `{option}` to "
                         "the column that holds it")
    return kwargs[name]


def named(fn: RewardFn, name: str) -> RewardFn:
    """The function, carrying the name TRL logs it under (`rewards/<name>/mean`)."""
    fn.__name__ = fn.__qualname__ = name
    return fn
