"""What every training method provides, and the base for every recipe section.

A method is a small object built from its own flat options (never the whole recipe). The training flow asks
it four things, in this order: extra `from_pretrained` arguments, how to make the model trainable, whether it
brings its own optimizer, and which callbacks it needs. Methods compose through this protocol; none inherits
from another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, TrainerCallback


class Section(BaseModel):
    """A recipe section: unknown keys are errors, and each field's docstring is its documentation."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def train_all(model):
    """Every parameter learns (full fine-tuning and GaLore)."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


class Method(Protocol):
    name: str
    #: Subdirectory of the run dir that holds the final weights: "model" (a full checkpoint) or "adapter".
    artifact: str

    def load_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for `from_pretrained` (e.g. a quantization config)."""
        ...

    def prepare(self, model: PreTrainedModel, new_token_ids: list[int]) -> PreTrainedModel:
        """Set what trains. `new_token_ids` are embedding rows added for the chat template: they must learn."""
        ...

    def optimizers(
        self, model: PreTrainedModel, learning_rate: float, weight_decay: float, max_grad_norm: float
    ) -> tuple[torch.optim.Optimizer, Any] | None:
        """An optimizer (and scheduler or None), or None to let the trainer build AdamW. A scheduler of None
        means the trainer builds the recipe's schedule on this optimizer."""
        ...

    def callbacks(self) -> list[TrainerCallback]:
        """Extra trainer callbacks the method needs."""
        ...
