"""The trainers finetune runs, subclasses of TRL's SFTTrainer, DPOTrainer and KTOTrainer (the objectives in
finetune.objectives build them), with every override of a library internal in one place.

Written against transformers 5.23 and TRL 1.16 (constraints.txt pins them); each override names the private
method it replaces, so an upgrade that renames one fails in tests/run/test_trainer.py instead of quietly changing
behaviour.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer as PlainTrainer
from transformers import TrainerCallback
from trl import DPOTrainer, KTOTrainer, SFTTrainer

#: The private Trainer methods overridden below; tests/run/test_trainer.py checks that each still exists.
OVERRIDDEN = ("_clip_grad_norm", "_get_grad_norm", "_prepare_for_training", "_save_checkpoint")
#: TRL's DPOTrainer methods overridden by PreferenceTrainer, checked the same way.
OVERRIDDEN_DPO = ("_prepare_dataset", "_precompute_ref_logps", "_compute_loss")
#: TRL's KTOTrainer methods overridden by UnpairedPreferenceTrainer, checked the same way.
OVERRIDDEN_KTO = ("_prepare_dataset",)
#: What TRL 1.16's SFTTrainer asks its fused LM head for; finetune asks for the first alone unless the recipe wants
#: TRL's per-step token metrics (tests/run/test_trainer.py pins that TRL still patches the head with these).
TOKEN_METRIC_OUTPUTS = ("log_probs", "entropy", "is_top1")
#: Devices where TRL's fused LM head runs its Triton kernel (trl.kernels.chunked_logprob._use_triton).
FUSED_HEAD_DEVICES = ("cuda", "xpu")


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (full disk, quota, read-only or failing volume)."""

    def __init__(self, path: Path, cause: BaseException):
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause


def lean_lm_head(model) -> None:
    """Patch TRL's fused LM head again, computing the labels' log-probabilities alone.

    SFTTrainer's head also computes each token's entropy and whether the label is the top-1 token, over the whole
    vocabulary, for two logged metrics; each extra output costs on every call (add_fused_lm_head's docs). TRL's
    patch is an instance attribute, so dropping it restores the model's own forward before patching again."""
    from trl.trainer.utils import add_fused_lm_head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vars(base).pop("forward", None)
    add_fused_lm_head(base, outputs=("log_probs",))


class PackedRows:
    """Collates packs as the rows of a batch, for SDPA and eager attention.

    TRL's padding-free collation concatenates a batch's packs into one sequence, which flash-attention's varlen
    kernels split again where the position ids restart. SDPA and eager attention get a dense block-diagonal mask
    over that whole sequence instead (transformers' masking_utils.find_packed_sequence_indices), so attention over
    batch x max_length tokens would cost batch times what it costs pack by pack. Here each pack stays a row, its
    positions restarting at each of its rows, and no attention mask is passed, from which transformers builds the
    same block-diagonal mask row by row. The padding after a short pack has position 0 at every token (TRL pads
    position ids with 0): each pad token is a sequence of its own, attending to itself, with no loss."""

    def __init__(self, pad_token_id: int):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, return_position_ids=True)

    def __call__(self, examples):
        batch = self.inner(examples)
        del batch["attention_mask"]  # a 2D mask would hide the packing: transformers looks for it only without one
        batch["labels"][batch["position_ids"] == 0] = -100  # a row's first token follows another row's last
        return batch


class TrainerFixes:
    """What finetune changes in transformers.Trainer whatever the objective (SFT through SFTTrainer, preferences
    through DPOTrainer): the gradient norm of layer-wise optimizers, backward through frozen layers under
    checkpointing, DDP with a changing trainable set, and checkpoint writes that fail. Listed first among a
    trainer's bases, so these override TRL's and transformers' methods of the same names."""

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


class Trainer(TrainerFixes, SFTTrainer):
    def __init__(self, *args, token_metrics: bool = False, chunked_loss: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_metrics = token_metrics
        self.chunked_loss = chunked_loss
        if not token_metrics:
            lean_lm_head(self.model)
        if self.padding_free and self.args.packing and "flash" not in self.model.config._attn_implementation:
            self.data_collator = PackedRows(self.data_collator.pad_token_id)  # TRL's flat sequence is for varlen

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's compute_loss, less the metrics: besides the entropy and accuracy, it gathers and reads back three
        # per-micro-batch counts (a device sync and, with several processes, a collective each). The paths it
        # takes for options finetune never sets (a custom loss, label smoothing, DFT, MoE aux loss) stay TRL's.
        if (self.token_metrics or return_outputs or self.aux_loss_enabled or self.compute_loss_func is not None
                or self.label_smoother is not None or self.args.loss_type != "nll"):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        chunked = self.chunked_loss if self.chunked_loss is not None else self.args.device.type in FUSED_HEAD_DEVICES
        if not chunked:
            # The fused head saves memory by computing each logits tile twice (forward, then again in backward):
            # without Triton that is one more LM-head matmul per step in torch, while host memory holds the whole
            # logits easily. So on a CPU the model's own loss, exactly as plain Trainer computes it.
            return PlainTrainer.compute_loss(self, model, inputs, num_items_in_batch=num_items_in_batch)
        outputs = model(**inputs, fused_lm_head=True)
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        # As TRL and Trainer.compute_loss: num_items_in_batch counts every rank's tokens and DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss


def drop_reference_adapter(trainer) -> None:
    """Given a peft model, TRL's DPO and KTO assume a pretrained adapter and keep a frozen copy of it, "ref", as the
    reference. finetune's adapters start with B = 0 (peft's LoRA init), so the starting policy is the base itself:
    without the copy, TRL disables the adapters for the reference forward instead, which is the same policy with no
    second adapter to hold or run. An init that is not the base (B != 0) keeps the copy."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ref" in getattr(model, "peft_config", {}) and all(
            not param.any() for name, param in model.named_parameters() if ".lora_B.default." in name):
        model.delete_adapter("ref")
        model.set_adapter("default")


class PreferenceTrainer(TrainerFixes, DPOTrainer):
    """TRL's DPOTrainer for the preference objectives: its own losses for dpo, `pair_loss` for the reference-free
    ones (finetune.objectives.simpo, orpo), which map each answer's summed log-probability and length to the loss."""

    def __init__(self, *args, pair_loss=None, **kwargs):
        self.pair_loss = pair_loss  # before TRL's __init__, which runs the reference pass
        super().__init__(*args, **kwargs)
        drop_reference_adapter(self)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self.pair_loss is not None:  # reference-free: the flag only kept TRL from loading a reference model
            return dataset
        # TRL keeps the reference log-probabilities in a file beside the dataset's own, which every rank reads back:
        # that would write into the shared prepared-data entry (or, with `datasets` caching off while training, into
        # each process's own temporary folder). The run dir is shared by the ranks and is the run's own.
        shared = Path(self.args.output_dir).parent / "reference-logps"
        shared.mkdir(parents=True, exist_ok=True)
        dataset._get_cache_file_path = lambda fingerprint: str(shared / f"{name}-{fingerprint}.arrow")
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _compute_loss(self, model, inputs, return_outputs):
        if self.pair_loss is None:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        mask = inputs["completion_mask"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        labels=inputs["input_ids"].masked_fill(mask == 0, -100), use_cache=False, fused_lm_head=True)
        shifted = mask[:, 1:]
        sums = outputs.log_probs[:, -shifted.size(1):].sum(dim=1)  # the head gives 0 where the label is masked
        lengths = shifted.sum(dim=1).clamp(min=1)
        (chosen_sum, rejected_sum), (chosen_len, rejected_len) = sums.chunk(2), lengths.chunk(2)
        loss, chosen, rejected = self.pair_loss(chosen_sum, rejected_sum, chosen_len, rejected_len)
        gather = self.accelerator.gather  # the metric names of TRL's DPO, so logs and finetune.run.report read the same
        for key, value in (("rewards/chosen", chosen), ("rewards/rejected", rejected),
                           ("rewards/accuracies", (chosen > rejected).float()), ("rewards/margins", chosen - rejected),
                           ("logps/chosen", chosen_sum.detach()), ("logps/rejected", rejected_sum.detach())):
            self._metrics[mode][key].append(gather(value).mean().item())
        return (loss, outputs) if return_outputs else loss

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # The rows arrive tokenised (finetune.data.preference): rendered with the run's chat template, the answer's
        # end of turn included, every refused row reported. TRL's own pass would render them again with the
        # tokenizer's template and drop rows whose prompt fills max_length without a word.
        return dataset


class UnpairedPreferenceTrainer(TrainerFixes, KTOTrainer):
    """TRL's KTOTrainer for the kto objective (finetune.objectives.kto)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        drop_reference_adapter(self)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Tokenised already (finetune.data.preference.labelled), for the reason PreferenceTrainer gives. What TRL's pass
        # adds beyond tokenising is kept: each answer's KL counterpart is its batch neighbour's answer, rotated by one
        # within each batch of the (sequentially read, seeded-shuffled) set, as TRL builds it.
        if not self.calculate_KL:
            return dataset

        def rotated(batch):
            return {"KL_completion_ids": [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]}

        return dataset.map(rotated, batched=True, batch_size=args.per_device_train_batch_size)


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
