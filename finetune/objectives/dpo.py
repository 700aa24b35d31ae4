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

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from finetune.objectives.base import ObjectiveOptions


class Options(ObjectiveOptions):
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
    reference: Literal["auto", "adapters_off", "precomputed"] = "auto"
    """Where the reference log-probabilities come from. `adapters_off` (LoRA): the base with the adapters disabled,
    one more no-grad forward per step. `precomputed`: one no-grad pass over the data before training (any method).
    `auto`: adapters_off for LoRA, precomputed for the methods that change the base weights. Neither keeps a second
    copy of the model."""

    data_kind: ClassVar[str] = "preference"
    sequences_per_row: ClassVar[int] = 2  # chosen and rejected go through the model in one batch

    @model_validator(mode="after")
    def _smoothing_for_robust(self):
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError(f"`label_smoothing` is used by loss_type robust only (loss_type is {self.loss_type})")
        return self

    def reference_for(self, method) -> str:
        """How the reference is obtained with this method: adapters_off or precomputed."""
        if self.reference != "auto":
            return self.reference
        return "adapters_off" if method.name == "lora" else "precomputed"

    def method_problem(self, method) -> str | None:
        if self.reference == "adapters_off" and method.name != "lora":
            return (f"objective.reference adapters_off needs method lora: {method.name} changes the base weights, so "
                    "disabling adapters cannot recover the reference; use `precomputed` (what `auto` picks)")
        targets = getattr(method, "target_modules", "all-linear")
        if method.name == "lora" and not isinstance(targets, str) and "lm_head" in targets:
            return ("objective dpo with a LoRA adapter on `lm_head`: TRL's DPO computes log-probabilities from the "
                    "head's weight directly, so that adapter would never train; drop lm_head from "
                    "method.target_modules")
        return None

    def recipe_problems(self, recipe) -> list[str]:
        problems = []
        if recipe.train.packing:
            problems.append("train.packing with objective dpo: not supported (each pair is one chosen and one "
                            "rejected sequence); turn packing off")
        if recipe.data.streaming:
            problems.append("data.streaming with objective dpo: not supported yet (the reference log-probabilities "
                            "are computed over the whole set); prepare the data up front")
        if recipe.data.sources is not None:
            problems.append("data.sources with objective dpo: mixtures are SFT-only for now; give one file in "
                            "data.train")
        if recipe.train.token_metrics:
            problems.append("train.token_metrics is an SFT metric; DPO logs its own (rewards, margins, accuracies)")
        if recipe.distributed.strategy in ("fsdp", "deepspeed"):
            problems.append(f"objective dpo with distributed.strategy {recipe.distributed.strategy}: not supported "
                            "yet (the reference pass is not sharded); use `ddp`")
        problem = self.method_problem(recipe.method)
        return problems + ([problem] if problem else [])


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


def build_trainer(options: Options, model, args, train, eval, tokenizer, optimizers, callbacks, **_):
    from finetune.trainer import PreferenceTrainer

    return PreferenceTrainer(model=model, args=args, train_dataset=train, eval_dataset=eval,
                             processing_class=tokenizer, optimizers=optimizers, callbacks=callbacks)
