"""The trainer arguments of a run: those every objective shares, from the recipe's train, model and distributed
sections, and the objective's own config built on them (TRL's SFTConfig, DPOConfig, KTOConfig)."""

from __future__ import annotations

from pathlib import Path

from finetune.recipe.schema import Recipe
from finetune.run import distributed


def trainer_args(recipe: Recipe, run_dir: Path, dtype):
    """The objective's trainer config (TRL's SFTConfig, DPOConfig): the arguments every objective shares,
    and its own."""
    from finetune.objectives import OBJECTIVES

    return OBJECTIVES[recipe.objective.name].trainer_args(
        recipe.objective, recipe.method, common_args(recipe, run_dir, dtype), max_length=recipe.data.max_length,
        packing=recipe.train.packing)


def common_args(recipe: Recipe, run_dir: Path, dtype) -> dict:
    """The trainer arguments every objective shares; the objective's module adds its own and builds its config."""
    import torch

    from finetune.run.trackers import tracker_args

    t, dist = recipe.train, recipe.distributed
    precision = distributed.mixed_precision(dist, recipe.model.dtype, dtype == torch.bfloat16)
    strategy = {
        "activation_checkpointing": recipe.model.gradient_checkpointing,
        **distributed.trainer_kwargs(dist, recipe.method, recipe.model.gradient_checkpointing),
    }
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),  # also makes multi-process CPU runs use gloo
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and is the one PyTorch recommends.
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=t.logging_steps,
        # transformers replaces a NaN/inf step loss by the running mean before logging it, which hides a diverged
        # run from the log and from finetune.run.guards; off, the logged loss is the true one.
        logging_nan_inf_filter=False,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=torch.cuda.is_available(),
        neftune_noise_alpha=t.neftune_noise_alpha,
        eval_on_start=t.eval_on_start,
        # Early stopping ends on the best evaluation's checkpoint (transformers' EarlyStoppingCallback needs this).
        **({"load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": False}
           if t.early_stopping_patience else {}),
        **tracker_args(t.report_to, run_dir),
        **strategy,
    )
