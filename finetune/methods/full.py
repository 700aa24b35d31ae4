"""Full fine-tuning: every parameter learns, with the trainer's AdamW."""

from __future__ import annotations

from typing import Literal

from finetune.methods.base import Section


class Options(Section):
    """Full fine-tuning: all parameters train."""

    name: Literal["full"] = "full"


class FullFineTune:
    name = "full"
    artifact = "model"

    def load_kwargs(self):
        return {}

    def prepare(self, model, new_token_ids):
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def optimizers(self, model, learning_rate, weight_decay):
        return None

    def callbacks(self):
        return []


def build() -> FullFineTune:
    return FullFineTune()
