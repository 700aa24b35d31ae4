"""A reward's recipe entry, `{fn: ..., weight: ..., ...options}`, checked as the recipe is read: the function's
shape, and a built-in's options against its own options class."""

from __future__ import annotations

import difflib
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from finetune.rewards.base import PASSED_BY_TRAINER
from finetune.rewards.registry import REWARDS


class RewardSpec(BaseModel):
    """One reward function of the recipe, with its weight; every other key is an option of the function."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    fn: str
    """A built-in (`exact_answer`, `format`, `json`, `length`), `path/to/file.py:function` (relative to the recipe's
    folder, or absolute) or `package.module:function` (importable from the run's environment)."""
    weight: float = 1.0
    """The reward's factor in the weighted sum TRL's GRPOTrainer advantages are computed from (its `reward_weights`).
    1.0: every reward counts the same unless the recipe says otherwise; 0 logs a reward without training on it, and
    a negative weight turns a score into a penalty."""

    @property
    def options(self) -> dict[str, Any]:
        """The entry's keys besides fn and weight: a built-in's options, or a user function's keyword arguments."""
        return dict(self.model_extra or {})

    @property
    def is_builtin(self) -> bool:
        return self.fn in REWARDS

    @model_validator(mode="after")
    def _check(self):
        problems = [] if math.isfinite(self.weight) else [f"weight {self.weight} is not a finite number"]
        if self.is_builtin:
            problems += builtin_option_problems(self.fn, self.options)
        else:
            problems += _function_problems(self.fn, self.options)
        if problems:
            raise ValueError(f"reward `{self.fn}`: " + "; ".join(problems))
        return self


def builtin_option_problems(name: str, options: dict[str, Any]) -> list[str]:
    """Each problem of a built-in's options, naming the key: unknown (with the nearest valid one), missing, wrong."""
    cls = REWARDS[name].options
    valid = [field.alias or key for key, field in cls.model_fields.items()]
    try:
        cls.model_validate(options)
    except ValidationError as err:
        return [_describe(error, name, valid) for error in err.errors()]
    return []


def _describe(error: dict, name: str, valid: list[str]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"did you mean `{close[0]}`?" if close else f"{name}'s options: {', '.join(valid) or 'none'}"
        return f"unknown option `{key}`; {hint}"
    if error["type"] == "missing":
        return f"option `{key}` is required"
    if not key:  # a check across options
        return message
    got = error.get("input")
    shown = "" if error["type"] == "value_error" or isinstance(got, dict) else f" (got {got!r})"
    return f"option `{key}`: {message}{shown}"


def _function_problems(fn: str, options: dict[str, Any]) -> list[str]:
    target, colon, attr = fn.rpartition(":")
    if not colon:
        close = difflib.get_close_matches(fn, list(REWARDS), n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`? " if close else ""
        return [f"not a built-in reward; {hint}the built-ins are {', '.join(REWARDS)}; a function of your own is "
                "`path/to/file.py:function` (relative to the recipe) or `package.module:function`"]
    problems = []
    if not target.strip() or not attr.isidentifier():
        problems.append("write a function of your own as `path/to/file.py:function` or `package.module:function`, "
                        "with both parts")
    clashes = [key for key in options if key in PASSED_BY_TRAINER]
    if clashes:
        problems.append(f"option {', '.join(f'`{k}`' for k in clashes)}: TRL passes the function an argument of that "
                        "name itself; rename the option")
    return problems
