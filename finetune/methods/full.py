"""Full fine-tuning: every parameter learns, with the trainer's AdamW."""

from __future__ import annotations

from typing import Literal

from finetune.methods.base import Section, train_all


class Options(Section):
    """Full fine-tuning: all parameters train."""

    name: Literal["full"] = "full"
    optim_bits: Literal[8, 32] = 32
    """AdamW state precision; 8 (bitsandbytes) quarters optimizer memory at a small cost in fidelity."""
    layerwise: bool = False
    """Step each parameter inside backward and free its gradient at once (finetune.optim.layerwise)."""


def uses_trainer_adamw(optim_bits: int, layerwise: bool) -> bool:
    """32-bit, stepped after backward: the trainer's own AdamW does it; anything else is finetune.optim's engine."""
    return optim_bits == 32 and not layerwise


class FullFineTune:
    name = "full"
    artifact = "model"

    def __init__(self, optim_bits: int = 32, layerwise: bool = False):
        self.bits, self.layerwise = optim_bits, layerwise

    def load_kwargs(self):
        return {}

    def prepare(self, model, new_token_ids):
        return train_all(model)

    def optimizers(self, model, learning_rate, weight_decay, max_grad_norm):
        if uses_trainer_adamw(self.bits, self.layerwise):
            return None
        from finetune.optim.layerwise import build_optimizer

        return build_optimizer(model, learning_rate, weight_decay, self.bits, self.layerwise, max_grad_norm), None

    def callbacks(self):
        return []


def build(optim_bits: int = 32, layerwise: bool = False) -> FullFineTune:
    return FullFineTune(optim_bits, layerwise)
