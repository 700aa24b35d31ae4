"""The built-in rewards by the name a recipe's `fn` gives them: each one's options and its builder.

The registry lives here rather than in finetune/rewards/__init__.py (which re-exports it) so that the spec and the
loader, which both read it, do not import the package that imports them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune.rewards.answers import ExactAnswerOptions, exact_answer
from finetune.rewards.base import RewardFn, RewardOptions
from finetune.rewards.shape import FormatOptions, JsonOptions, LengthOptions, format_reward, json_reward, length_reward


@dataclass(frozen=True)
class Builtin:
    """A built-in reward: its options class (the recipe entry's other keys) and the builder that turns validated
    options into a function of TRL's reward signature. Calling it builds from keyword options."""

    options: type[RewardOptions]
    build: Callable[[Any], RewardFn]

    def __call__(self, **options: Any) -> RewardFn:
        return self.build(self.options.model_validate(options))


REWARDS: dict[str, Builtin] = {
    "exact_answer": Builtin(ExactAnswerOptions, exact_answer),
    "format": Builtin(FormatOptions, format_reward),
    "json": Builtin(JsonOptions, json_reward),
    "length": Builtin(LengthOptions, length_reward),
}
