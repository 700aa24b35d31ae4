"""What every objective provides: its recipe section and its answers about data, methods and memory."""

from __future__ import annotations

from typing import ClassVar

from finetune.methods.base import Section


class ObjectiveOptions(Section):
    """An objective's recipe section. Defaults: rows are conversations, one sequence each, every method works."""

    #: The data it trains on: "conversations" (finetune.data.prepare) or "preference" (finetune.data.preference).
    data_kind: ClassVar[str] = "conversations"
    #: Sequences one row puts through the model per step (the plan's activations and loss scale with it).
    sequences_per_row: ClassVar[int] = 1

    def method_problem(self, method) -> str | None:
        """Why this objective cannot train with the method (its options), with the alternative."""
        return None

    def recipe_problems(self, recipe) -> list[str]:
        """Settings elsewhere in the recipe this objective cannot honour, each with the alternative."""
        return []

    def reference_for(self, method) -> str | None:
        """How the reference policy is obtained for the method: None when the objective needs none."""
        return None
