"""Direct preference optimisation (DPO, arXiv:2305.18290) and its loss variants, through TRL's DPOTrainer.

The loss compares the policy's log-probability ratio to a reference policy (the model as training starts) on a
chosen and a rejected answer. The reference never needs a second copy of the model in memory:
- LoRA/QLoRA: the base with the adapters disabled (TRL's own handling of a peft model): one extra no-grad forward
  per step;
- full, GaLore, LISA (and LoRA when asked): each row's reference log-probabilities are computed in one no-grad pass
  over the data before the first step (TRL's `precompute_ref_log_probs`). These methods change the base weights, so
  disabling anything cannot recover the reference; a frozen second copy would double the weights' memory (13 GB
  more for a 7B model in bf16). A resumed run computes them again from the same base: the same values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from finetune.objectives.base import ReferenceOptions


class Options(ReferenceOptions):
    """Preference tuning on (prompt, chosen, rejected) rows: raise the chosen answer's likelihood relative to the
    rejected one's, measured against the model as training starts."""

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    """How far the policy may move from the reference (the implicit reward is beta x the log-probability ratio).
    0.1 is the DPO paper's (arXiv:2305.18290) and TRL's default; lower lets the model move further."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """`sigmoid`: DPO's loss. `ipo`: IPO (arXiv:2310.12036), a squared loss that stops pushing a pair's margin once it
    reaches 1/(2 beta), so deterministic preferences do not overfit (beta is its tau). `hinge`: SLiC-HF's
    (arXiv:2305.10425). `robust`: rDPO (arXiv:2403.00409) for noisy labels, with `label_smoothing`."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """`robust` only: the probability that a pair's preference is flipped (0.1 is rDPO's suggestion for noisy sets)."""

    @model_validator(mode="after")
    def _smoothing_for_robust(self):
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError(f"`label_smoothing` is used by loss_type robust only (loss_type is {self.loss_type})")
        return self

    def summary(self, method) -> str:
        return f"dpo (beta {self.beta}, {self.loss_type}); {self.reference_line(method)}"

    def build_vision_data(self, recipe, processor, log):
        """Preference rows with images in their prompts (finetune.data.vision_pairs)."""
        from finetune.data.vision_pairs import build_vision_pairs

        return build_vision_pairs(processor, recipe, log)


def trainer_args(options: Options, method, common: dict, max_length: int, packing: bool):
    """TRL's DPOConfig: the run's common trainer arguments and this objective's (packing is refused before)."""
    from trl import DPOConfig

    return DPOConfig(
        **common,
        beta=options.beta,
        loss_type=[options.loss_type],
        label_smoothing=options.label_smoothing,
        precompute_ref_log_probs=options.reference_for(method) == "precomputed",
        max_length=None,  # rows are already cut to data.max_length (finetune.data.preference reports which)
    )


def reference_free_args(common: dict, beta: float):
    """The DPOConfig of a reference-free objective (simpo, orpo). TRL's precompute flag is set only so that TRL
    loads no reference model; PreferenceTrainer then skips the pass itself (finetune.run.trainer)."""
    from trl import DPOConfig

    return DPOConfig(**common, beta=beta, precompute_ref_log_probs=True, max_length=None)


def build_trainer(options, model, args, train, eval, tokenizer, optimizers, callbacks, pair_loss=None,
                  data_collator=None, **_):
    from finetune.run.trainer import PreferenceTrainer

    return PreferenceTrainer(model=model, args=args, train_dataset=train, eval_dataset=eval,
                             processing_class=tokenizer, optimizers=optimizers, callbacks=callbacks,
                             pair_loss=pair_loss, data_collator=data_collator)
