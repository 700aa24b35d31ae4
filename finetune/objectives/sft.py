"""Supervised fine-tuning: the assistant's tokens' cross-entropy, through TRL's SFTTrainer (finetune.run.trainer)."""

from __future__ import annotations

from typing import Literal

from finetune.objectives.base import ObjectiveOptions


class Options(ObjectiveOptions):
    """Supervised fine-tuning on conversations: the model learns what the assistant says, nothing else."""

    name: Literal["sft"] = "sft"

    def build_vision_data(self, recipe, processor, log):
        from finetune.data.vision_data import build_vision_data

        return build_vision_data(processor, recipe, log)


def trainer_args(options: Options, method, common: dict, max_length: int, packing: bool):
    """TRL's SFTConfig: the run's common trainer arguments and SFT's own."""
    from trl import SFTConfig

    return SFTConfig(**common, max_length=max_length,  # rows are already cut to this; TRL's cut is then a no-op
                     packing=packing)


def build_trainer(options: Options, model, args, train, eval, tokenizer, optimizers, callbacks, token_metrics,
                  chunked_loss=None, data_collator=None, **_):
    from finetune.run.trainer import Trainer

    return Trainer(model=model, args=args, train_dataset=train, eval_dataset=eval, processing_class=tokenizer,
                   optimizers=optimizers, callbacks=callbacks, token_metrics=token_metrics, chunked_loss=chunked_loss,
                   data_collator=data_collator)
