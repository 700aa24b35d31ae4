"""KTO (arXiv:2402.01306): preference tuning from answers labelled desirable or not, no pairs needed.

Each answer's reward is beta x its log-ratio to the reference policy, compared with an estimate of the KL between
policy and reference over mismatched (prompt, answer) pairs of the same batch; desirable answers are pushed above
it, undesirable ones below, weighted by `desirable_weight` / `undesirable_weight`. Built on TRL's KTOTrainer, with
the reference obtained as for dpo (finetune.objectives.base.ReferenceOptions): adapters off for LoRA, precomputed
otherwise, never a second copy of the model."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from finetune.objectives.base import ReferenceOptions


class Options(ReferenceOptions):
    """Preference tuning on single answers marked desirable (true) or undesirable (false)."""

    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0)
    """How far the policy may move from the reference; 0.1 is the KTO paper's default (arXiv:2402.01306) and TRL's."""
    desirable_weight: float = Field(1.0, gt=0)
    """Loss weight of desirable answers. The paper advises weights that put desirable_weight x their count at 1 to
    4/3 times undesirable_weight x theirs: raise this when desirable answers are the fewer."""
    undesirable_weight: float = Field(1.0, gt=0)
    """Loss weight of undesirable answers (see desirable_weight)."""

    data_kind: ClassVar[str] = "unpaired"
    sequences_per_row: ClassVar[int] = 2  # each answer, and the mismatched answer of the KL estimate

    def summary(self, method) -> str:
        return (f"kto (beta {self.beta}, weights {self.desirable_weight} desirable / {self.undesirable_weight} "
                f"undesirable); {self.reference_line(method)}")

    def recipe_problems(self, recipe) -> list[str]:
        problems = super().recipe_problems(recipe)
        if recipe.train.batch_size < 2:
            problems.append("objective kto needs train.batch_size >= 2: its KL estimate pairs each answer with "
                            "another row's prompt of the same batch")
        return problems


def trainer_args(options: Options, method, common: dict, max_length: int, packing: bool):
    """TRL's KTOConfig: the run's common trainer arguments and this objective's."""
    from trl import KTOConfig

    return KTOConfig(**common, beta=options.beta, desirable_weight=options.desirable_weight,
                     undesirable_weight=options.undesirable_weight,
                     precompute_ref_log_probs=options.reference_for(method) == "precomputed",
                     max_length=None)  # rows are already cut to data.max_length


def build_trainer(options: Options, model, args, train, eval, tokenizer, optimizers, callbacks, **_):
    from finetune.run.trainer import UnpairedPreferenceTrainer

    return UnpairedPreferenceTrainer(model=model, args=args, train_dataset=train, eval_dataset=eval,
                                     processing_class=tokenizer, optimizers=optimizers, callbacks=callbacks)
