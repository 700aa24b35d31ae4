"""What every training method provides.

A method module has two halves, next to each other:
- `Options`, its recipe section, which also answers what the rest of finetune asks before any model exists:
  which distributed strategies it works with, whether it brings its own optimizer, and its memory model for
  `finetune plan`. `recipe/distributed.py` and `plan/` ask these and never branch on a method's name.
- `Method`, built from the options' flat values (never the whole recipe), which the training flow asks five things
  in this order: extra `from_pretrained` arguments, how to make the model trainable, whether it brings its own
  optimizer, which callbacks it needs, and how to write the final weights.
Both have no-op defaults here, so a method states only what it changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from finetune.recipe.section import Section

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, TrainerCallback


def train_all(model):
    """Every parameter learns (full fine-tuning and GaLore)."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


class MethodOptions(Section):
    """A method's recipe section and its capabilities. Defaults: every parameter trains with the trainer's AdamW,
    under any strategy."""

    #: The method steps finetune.optim's per-parameter optimizers instead of the trainer's AdamW.
    uses_own_optimizer: ClassVar[bool] = False
    #: The trainable set changes during the run (DDP must then look for unused parameters).
    changes_trainable_set: ClassVar[bool] = False
    #: The output head trains (its gradient buffer then counts in the loss backward).
    head_trains: ClassVar[bool] = True

    def strategy_problem(self, strategy: str, zero_stage: int | None) -> str | None:
        """Why this method cannot run under the strategy (`ddp`, `fsdp`, `deepspeed`), with the alternative."""
        return None

    # --- memory model for `finetune plan` (finetune.plan.estimate names the components) ---------------------------

    @property
    def steps_in_backward(self) -> bool:
        """No large optimizer step after backward: layer-wise stepping, or an optimizer over few parameters."""
        return getattr(self, "layerwise", False)

    def planned_trainable(self, model) -> dict[str, int]:
        """Name -> element count of what trains, on a meta-device model."""
        return {n: p.numel() for n, p in model.named_parameters()}

    def planned_rows(self, model, trainable: dict[str, int], setup) -> dict[str, float]:
        """Bytes of the components this method owns: optimizer states, gradients, and any of its own."""
        from finetune.plan.memory import adam_state_bytes, gradient_bytes

        params = dict(model.named_parameters())
        bits = getattr(self, "optim_bits", 32)
        return {"optimizer states": sum(adam_state_bytes(n, bits, setup.weight_bytes) for n in trainable.values()),
                "gradients": gradient_bytes(trainable, params, setup.weight_bytes, getattr(self, "layerwise", False),
                                            setup.accumulation)}

    def planned_activation_bytes(self, model, setup) -> float:
        """What the method's own modules save for backward in one forward, beyond the model's activations."""
        return 0.0

    def planned_adapted_layers(self, model) -> int:
        """Linear layers the method wraps with an adapter (`finetune plan --fit`'s cost model times what one adds)."""
        return 0

    def planned_step_flops(self, model) -> float:
        """FLOPs the method adds to each optimizer step beyond forward and backward (`finetune plan --fit`'s cost
        model); the AdamW update itself is counted as memory traffic there."""
        return 0.0

    @classmethod
    def plan_alternatives(cls, like: MethodOptions) -> dict[str, MethodOptions]:
        """The variants `finetune plan` shows beside the recipe's method; `like` is the recipe's method (its
        sizes, e.g. a LoRA rank, are kept when it is this method)."""
        return {}

    @classmethod
    def memory_savers(cls) -> list[tuple[int, MethodOptions, str]]:
        """(disruption rank, options, advice) switches `finetune plan` tries when a run does not fit; the lower
        the rank, the less the switch changes what trains."""
        return []


class Method:
    """The built method. Defaults: nothing extra to load, every parameter trains, the trainer's AdamW, no
    callbacks, a full checkpoint as the final weights."""

    name: str
    #: Subdirectory of the run dir that holds the final weights: "model" (a full checkpoint) or "adapter".
    artifact = "model"

    def load_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for `from_pretrained` (e.g. a quantization config)."""
        return {}

    def prepare(self, model: PreTrainedModel, new_token_ids: list[int]) -> PreTrainedModel:
        """Set what trains. `new_token_ids` are embedding rows added for the chat template: they must learn."""
        return train_all(model)

    def optimizers(
        self, model: PreTrainedModel, learning_rate: float, weight_decay: float, max_grad_norm: float
    ) -> tuple[torch.optim.Optimizer, Any] | None:
        """An optimizer (and scheduler or None), or None to let the trainer build AdamW. A scheduler of None
        means the trainer builds the recipe's schedule on this optimizer."""
        return None

    def callbacks(self) -> list[TrainerCallback]:
        """Extra trainer callbacks the method needs."""
        return []

    def save(self, trainer, path) -> None:
        """Write the final weights into `path` (every rank calls it; the trainer writes on the main process)."""
        trainer.save_model(str(path))
