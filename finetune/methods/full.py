"""Full fine-tuning: every parameter learns, with the trainer's AdamW or finetune's per-parameter engine."""

from __future__ import annotations

from typing import Literal

from finetune.methods import base

SHARDED = ("fsdp", "deepspeed")


class Options(base.MethodOptions):
    """Full fine-tuning: all parameters train."""

    name: Literal["full"] = "full"
    optim_bits: Literal[8, 32] = 32
    """AdamW state precision; 8 (bitsandbytes) quarters optimizer memory at a small cost in fidelity."""
    layerwise: bool = False
    """Step each parameter inside backward and free its gradient at once (finetune.optim.layerwise)."""

    @property
    def uses_own_optimizer(self) -> bool:
        return not uses_trainer_adamw(self.optim_bits, self.layerwise)

    def strategy_problem(self, strategy, zero_stage):
        if strategy in SHARDED and self.uses_own_optimizer:
            return (f"method full with optim_bits {self.optim_bits} / layerwise {self.layerwise} and strategy "
                    f"{strategy}: the per-parameter (8-bit, layer-wise) optimizers need whole gradients on every "
                    "rank. Use `distributed.strategy: ddp`, or 32-bit AdamW without layerwise (sharding already "
                    "divides the optimizer states by the number of GPUs)")
        return None

    @classmethod
    def plan_alternatives(cls, like):
        return {"full AdamW": cls(), "full 8-bit AdamW": cls(optim_bits=8)}

    @classmethod
    def memory_savers(cls):
        return [(1, cls(optim_bits=8, layerwise=True),
                 "8-bit layer-wise AdamW (method.optim_bits: 8, method.layerwise: true)")]


def uses_trainer_adamw(optim_bits: int, layerwise: bool) -> bool:
    """32-bit, stepped after backward: the trainer's own AdamW does it; anything else is finetune.optim's engine."""
    return optim_bits == 32 and not layerwise


class FullFineTune(base.Method):
    name = "full"

    def __init__(self, optim_bits: int = 32, layerwise: bool = False):
        self.optim_bits, self.layerwise = optim_bits, layerwise

    def optimizers(self, model, learning_rate, weight_decay, max_grad_norm):
        if uses_trainer_adamw(self.optim_bits, self.layerwise):
            return None
        from finetune.optim.layerwise import build_optimizer

        return build_optimizer(model, learning_rate, weight_decay, self.optim_bits, self.layerwise,
                               max_grad_norm), None


Method = FullFineTune  # the registry builds `Method` from `Options`
