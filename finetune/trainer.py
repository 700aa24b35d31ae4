"""The one SFTTrainer subclass, with every override of a library internal in one place.

Written against transformers 5.23 and TRL 1.16 (constraints.txt pins them); each override names the private
method it replaces, so an upgrade that renames one fails in tests/test_trainer.py instead of quietly changing
behaviour.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from trl import SFTTrainer

#: The private Trainer methods overridden below; tests/test_trainer.py checks that each still exists.
OVERRIDDEN = ("_clip_grad_norm", "_get_grad_norm", "_prepare_for_training", "_save_checkpoint")


def narrow_cpu_lm_head_tiles(width: int) -> None:
    """TRL 1.16's fused LM head sizes its tiles (32768 vocabulary entries) for its Triton kernel; its torch
    fallback holds about nine fp32 tiles at once, ~1.2 GB at 1024 tokens on SmolLM2's 49k vocabulary, more than
    the model's weights. Narrower tiles give the same per-token log-probabilities with a fraction of that memory
    (finetune.measure compares both). TRL reads the width from this module global at each call; CUDA keeps
    TRL's own."""
    import torch
    import trl.trainer.utils as trl_utils

    if not torch.cuda.is_available():
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = width  # tests/test_trainer.py pins that TRL still reads it


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (full disk, quota, read-only or failing volume)."""

    def __init__(self, path: Path, cause: BaseException):
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause


class Trainer(SFTTrainer):
    # A layer-wise optimizer has stepped every parameter and freed its gradient inside backward, so the
    # trainer's norm over .grad would read 0 (as it does for transformers' own layer-wise optimizers) and
    # its clipping would act on nothing. Such an optimizer clips per parameter and reports the true norm.
    def _in_backward_optimizer(self):
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # unwrap accelerate's wrapper
        return inner if getattr(inner, "steps_in_backward", False) else None

    def _clip_grad_norm(self, model):
        inner = self._in_backward_optimizer()
        return inner.step_grad_norm() if inner else super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        inner = self._in_backward_optimizer()
        return inner.step_grad_norm() if grad_norm is None and inner else super()._get_grad_norm(model, grad_norm)

    def _prepare_for_training(self, *args, **kwargs):
        from torch.nn.parallel import DistributedDataParallel

        # Turning checkpointing on, transformers makes the embeddings' output require grad, which only
        # reentrant checkpointing needs (we use non-reentrant). Kept, it makes backward run through every
        # frozen layer below the lowest trained one, for a gradient nobody uses (LISA with frozen embeddings).
        if self.args.activation_checkpointing and hasattr(self.model, "disable_input_require_grads"):
            self.model.disable_input_require_grads()
        # DDP's reducer only covers parameters that require grad when it wraps the model; a method whose
        # trainable set changes during the run (LISA) has every parameter registered, the idle ones unused.
        idle = [p for p in self.model.parameters() if not p.requires_grad] if self.args.ddp_find_unused_parameters \
            else []
        for param in idle:
            param.requires_grad_(True)
        try:
            model, dataloader = super()._prepare_for_training(*args, **kwargs)
        finally:
            for param in idle:
                param.requires_grad_(False)
        inner = self._in_backward_optimizer()
        if inner is not None and isinstance(model, DistributedDataParallel):
            inner.step_after_allreduce(model)
        return model, dataloader

    def _save_checkpoint(self, model, trial):
        # torch, safetensors and the OS each report a full disk differently (RuntimeError from the zip writer,
        # SafetensorError, OSError); one error type with the checkpoint's path lets the flow say what to do.
        from safetensors import SafetensorError

        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError, SafetensorError) as err:
            raise CheckpointWriteError(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}",
                                       err) from err


class ContinueSchedule(TrainerCallback):
    """On resume, set the learning rate to what the rebuilt schedule gives at the resumed step.

    The trainer rebuilds the schedule for the run's (possibly new) length and restores only its step counter,
    while the optimizer's restored learning rate is the one the old schedule set. When the length changed, the
    first resumed step would train at the old curve's rate (0 after a finished cosine run) and the later ones at
    the new curve's. With this, every resumed step N follows the new curve, as a run of the new length would.
    A no-op when the length is unchanged: both curves give the same rate."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        from torch.optim.lr_scheduler import LambdaLR

        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # unwrap accelerate's wrapper
        if state.global_step == 0 or not isinstance(scheduler, LambdaLR):
            return
        optimizer = getattr(scheduler, "optimizer", optimizer)
        rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, value in zip(optimizer.param_groups, rates):
            group["lr"] = value
        scheduler._last_lr = rates  # what the trainer logs as the step's learning rate
