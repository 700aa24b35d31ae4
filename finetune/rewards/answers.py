"""The `exact_answer` reward, and the answer matching that evaluation shares with it: pull the final answer out of a
completion by a rule, then compare it with the row's expected answer, strictly and leniently."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import model_validator

from finetune.rewards.base import RewardFn, RewardOptions, column, named

#: A number as models write them: an optional minus, thousands commas, decimals. The minus counts only where it cannot
#: be a hyphen or a subtraction (not right after a letter, digit or closing bracket), so "pages 3-4" ends in 4, not -4.
NUMBER = re.compile(r"(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
ANSWER_TAGS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOXED = "\\boxed{"
_NUMERIC = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?")


class ExactAnswerOptions(RewardOptions):
    """1.0 when the completion's final answer equals the row's expected answer, else 0.0: the verifiable reward of
    DeepSeekMath's and DeepSeek-R1's GRPO runs (arXiv:2402.03300, arXiv:2501.12948)."""

    column: str = "answer"
    """The row column holding the expected answer. `answer` is GSM8K's column name (and the name most prompt sets with
    a reference answer use); a value that is not a string (an int) is compared as its text."""
    extract: Literal["last_number", "boxed", "answer_tags", "whole", "regex"] = "last_number"
    """How the final answer is found in the completion. `last_number`: the last number in the text (GSM8K-style
    answers; minus signs, decimals, thousands commas). `boxed`: the content of the last `\\boxed{...}` (the MATH
    convention, nested braces kept). `answer_tags`: the content of the last `<answer>...</answer>` (DeepSeek-R1's
    template). `whole`: the whole completion, trimmed. `regex`: group 1 of the last match of `pattern`."""
    pattern: str | None = None
    """`extract: regex` only: a Python regular expression with exactly one group, around the answer."""
    mode: Literal["strict", "lenient"] = "strict"
    """`strict`: the extracted answer must equal the expected one character for character (surrounding whitespace
    aside), so the model is rewarded for the required format too; "42.0" is not "42". `lenient`: case, `$`, a
    trailing period and thousands commas are ignored, numbers compare as numbers, and a completion whose rule finds
    no match falls back to its last number: the model is rewarded for knowing the answer, in any format."""

    @model_validator(mode="after")
    def _pattern_for_regex(self):
        if self.extract != "regex":
            if self.pattern is not None:
                raise ValueError(f"`pattern` is used by extract regex only (extract is {self.extract})")
            return self
        if self.pattern is None:
            raise ValueError("extract regex needs `pattern`, a regular expression whose one group is the answer")
        try:
            groups = re.compile(self.pattern).groups
        except re.error as err:
            raise ValueError(f"`pattern` {self.pattern!r} does not compile: {err}") from None
        if groups != 1:
            raise ValueError(f"`pattern` {self.pattern!r} has {groups} groups; it needs exactly one, around the answer "
                             "(write other parentheses as (?:...))")
        return self

    def columns(self) -> dict[str, str]:
        return {self.column: "column"}


def exact_answer(options: ExactAnswerOptions) -> RewardFn:
    """The reward: 1.0 for a match under the options' mode, else 0.0; None for a row with no expected answer (TRL
    leaves such a completion out of this reward's mean)."""
    lenient = options.mode == "lenient"

    def reward(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
        expected = column(kwargs, options.column, "column")
        scores: list[float | None] = []
        for completion, answer in zip(completions, expected):
            if answer is None:
                scores.append(None)
                continue
            strict, loose = score_answer(completion, answer, options.extract, options.pattern)
            scores.append(float(loose if lenient else strict))
        return scores

    return named(reward, "exact_answer")


def score_answer(completion: str, expected: Any, extract: str = "last_number",
                 pattern: str | None = None) -> tuple[bool, bool]:
    """(strict, lenient) match of the completion's final answer with the expected one; strict implies lenient.

    strict: the rule found an answer equal to the expected one after trimming surrounding whitespace. lenient: the
    rule's answer, or failing that the completion's last number, equals the expected one once both are normalised
    (see `normalise`). No expected answer (None) matches nothing."""
    if expected is None:
        return False, False
    expected = expected if isinstance(expected, str) else str(expected)
    found = extract_answer(completion, extract, pattern)
    strict = found is not None and found.strip() == expected.strip()
    target = normalise(expected)
    lenient = strict or (found is not None and normalise(found) == target)
    if not lenient:
        last = last_number(completion)
        lenient = last is not None and normalise(last) == target
    return strict, lenient


def extract_answer(completion: str, extract: str, pattern: str | None = None) -> str | None:
    """The final answer the rule finds in the completion, or None when it finds none."""
    if extract == "last_number":
        return last_number(completion)
    if extract == "boxed":
        return last_boxed(completion)
    if extract == "answer_tags":
        found = ANSWER_TAGS.findall(completion)
        return found[-1].strip() if found else None
    if extract == "whole":
        return completion.strip()
    if extract == "regex":
        if pattern is None:
            raise ValueError("extract regex needs a pattern")
        matches = list(re.finditer(pattern, completion))
        return matches[-1].group(1) if matches and matches[-1].group(1) is not None else None
    raise ValueError(f"unknown extract rule {extract!r}")


def last_number(text: str) -> str | None:
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def last_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}`, braces inside it balanced; an unclosed one (a completion cut
    at max_completion_length) is skipped for the one before it."""
    start = text.rfind(BOXED)
    while start != -1:
        depth, begin = 1, start + len(BOXED)
        for i in range(begin, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[begin:i].strip()
        start = text.rfind(BOXED, 0, start)
    return None


def normalise(answer: str) -> tuple[str, Any]:
    """An answer as lenient matching compares it: ("number", value) for a number (thousands commas dropped, so 1,000
    == 1000 and 42 == 42.0), else ("text", lower-cased text); `$` signs, surrounding whitespace and a trailing period
    removed from both."""
    text = re.sub(r"\\?\$", "", answer).strip().rstrip(".").strip().lower()
    if _NUMERIC.fullmatch(text):
        return "number", float(text.replace(",", ""))
    return "text", text
