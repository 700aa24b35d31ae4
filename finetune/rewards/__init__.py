"""Reward functions for online RL (GRPO): the built-ins a recipe names (`exact_answer`, `format`, `json`, `length`),
the user's own from a file or module, loaded and wrapped so that their failures name the function and the row, and
the check that tries them all on the first rows before training."""

from __future__ import annotations

from finetune.rewards.answers import extract_answer, score_answer
from finetune.rewards.base import RewardFn, RewardOptions
from finetune.rewards.load import Reward, build_rewards
from finetune.rewards.probe import probe
from finetune.rewards.registry import REWARDS, Builtin
from finetune.rewards.spec import RewardSpec

__all__ = ["REWARDS", "Builtin", "Reward", "RewardFn", "RewardOptions", "RewardSpec", "build_rewards",
           "extract_answer", "probe", "score_answer"]
