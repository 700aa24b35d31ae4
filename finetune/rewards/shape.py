"""The rewards for a completion's shape rather than its answer: `format` (a regular expression over the whole
completion), `json` (it parses, and validates against a schema) and `length` (a soft penalty past a target)."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from finetune.rewards.base import RewardFn, RewardOptions, RowProblem, column, named
from finetune.rewards.schema import first_error, schema_problems

#: One Markdown code fence around the JSON, as chat models write it even when asked not to.
FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL | re.IGNORECASE)


class FormatOptions(RewardOptions):
    """1.0 when the whole completion matches a regular expression, else 0.0: DeepSeek-R1's format reward
    (arXiv:2501.12948), e.g. `<think>.*?</think>\\s*<answer>.*?</answer>`."""

    pattern: str
    """A Python regular expression the whole completion must match (re.fullmatch, with `.` matching newlines too:
    reasoning spans lines). Add `\\s*` at an end to allow surrounding whitespace."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern, re.DOTALL)
        except re.error as err:
            raise ValueError(f"does not compile: {err}") from None
        return pattern


def format_reward(options: FormatOptions) -> RewardFn:
    compiled = re.compile(options.pattern, re.DOTALL)

    def reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        return [float(compiled.fullmatch(completion) is not None) for completion in completions]

    return named(reward, "format")


class JsonOptions(RewardOptions):
    """1.0 when the completion is JSON (one ```json fence around it is accepted) that validates against the schema,
    if one is given, else 0.0: structured output and tool calls."""

    json_schema: dict | None = Field(None, alias="schema")
    """A JSON Schema every completion must satisfy. finetune checks a subset (type, properties, required,
    additionalProperties true/false, items, enum, const, minItems/maxItems, minimum/maximum, minLength/maxLength,
    anyOf); a schema using any other keyword is refused when the recipe is read."""
    schema_column: str | None = None
    """Instead of `schema`: the row column holding each row's schema (a mapping, or its JSON text), for prompt sets
    whose rows ask for different structures (each row's tool). A row whose value is empty is not scored (None)."""

    @model_validator(mode="after")
    def _one_schema(self):
        if self.json_schema is not None and self.schema_column is not None:
            raise ValueError("give `schema` or `schema_column`, not both")
        if self.json_schema is not None:
            problems = schema_problems(self.json_schema)
            if problems:
                raise ValueError("; ".join(problems))
        return self

    def columns(self) -> dict[str, str]:
        return {self.schema_column: "schema_column"} if self.schema_column else {}


def json_reward(options: JsonOptions) -> RewardFn:
    def reward(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
        if options.schema_column is None:
            return [float(_valid(completion, options.json_schema)) for completion in completions]
        scores: list[float | None] = []
        schemas = column(kwargs, options.schema_column, "schema_column")
        for i, (completion, raw) in enumerate(zip(completions, schemas)):
            schema = _row_schema(raw, options.schema_column, i)
            scores.append(None if schema is None else float(_valid(completion, schema)))
        return scores

    return named(reward, "json")


def parse_json(completion: str) -> tuple[bool, Any]:
    """(parsed, value) of the completion, trimmed and out of one code fence. NaN and Infinity are Python's extensions,
    not JSON, and do not parse."""
    text = completion.strip()
    fenced = FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1)
    try:
        return True, json.loads(text, parse_constant=_not_json)
    except ValueError:
        return False, None


def _valid(completion: str, schema: dict | None) -> bool:
    parsed, value = parse_json(completion)
    return parsed and (schema is None or first_error(value, schema) is None)


def _row_schema(raw: Any, name: str, index: int) -> dict | None:
    if raw is None or raw == "" or raw == {}:
        return None
    schema = raw
    if isinstance(raw, str):
        try:
            schema = json.loads(raw)
        except ValueError as err:
            raise RowProblem(f"column `{name}` is not JSON ({err}); it must hold a JSON schema", index) from None
    problems = schema_problems(schema, f"column `{name}`")
    if problems:
        raise RowProblem("; ".join(problems), index)
    return schema


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


class LengthOptions(RewardOptions):
    """A soft penalty on long completions: 0 up to `target` tokens, then falling linearly to -max_penalty at twice the
    target, and staying there. Kimi k1.5's length penalty (arXiv:2501.12599) and DAPO's soft overlong punishment
    (arXiv:2503.14476) are of this shape: it discourages rambling without the cliff of a hard cut."""

    target: int = Field(gt=0)
    """Completion length, in tokens, up to which there is no penalty."""
    max_penalty: float = Field(1.0, gt=0)
    """The penalty from twice the target on. 1.0 weighs a completion twice too long like a wrong answer of the
    `exact_answer` reward (1 vs 0), so length never pays more than correctness."""


def length_reward(options: LengthOptions) -> RewardFn:
    """Lengths are counted from TRL's `completion_ids`; when a caller passes none (an evaluation over plain text),
    from whitespace-separated words, which undercounts tokens (about 0.75 words per token in English)."""
    target, penalty = options.target, options.max_penalty

    def reward(prompts: list[str], completions: list[str], completion_ids: list | None = None,
               **kwargs) -> list[float]:
        lengths = ([len(ids) for ids in completion_ids] if completion_ids is not None
                   else [len(completion.split()) for completion in completions])
        return [0.0 if n <= target else -penalty * min(1.0, (n - target) / target) for n in lengths]

    return named(reward, "length")
