"""The training flow, top to bottom: recipe -> data -> model -> method -> SFTTrainer -> run dir.

A run directory holds:
  recipe.yaml       the resolved recipe (defaults and --set overrides filled in)
  run.json          what produced the weights: base model, its resolved path and weight hash, method
  held_out.jsonl    the exact held-out rows, for `finetune eval`
  model/|adapter/   final weights with tokenizer (a full checkpoint, or a peft adapter)
  checkpoints/      resumable trainer checkpoints
  metrics.jsonl     one JSON object per logging step
  loss.png          the loss curve
  accelerate.yaml   (multi-process runs) the accelerate config the processes were launched with

Multi-process: `run_training` outside a launcher, with a distributed strategy, claims the run dir and starts the
processes through accelerate (finetune.distributed); each of them runs this same flow, and only global rank 0
writes the run dir. Under a user's own `accelerate launch`/`torchrun`, rank 0 claims the run dir itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import yaml

from finetune import __version__
from finetune import distributed
from finetune.errors import UserError
from finetune.recipe import Recipe


def run_training(recipe: Recipe, recipe_path: Path, output: Path | None = None, overwrite: bool = False,
                 resume: bool = False, log=print, overrides: list[str] = ()) -> Path:
    from transformers.trainer_utils import get_last_checkpoint

    run_dir = Path(output or recipe.train.output_dir or Path("runs") / recipe_path.stem)
    dist = recipe.distributed
    distributed.check_runtime(dist)
    if dist.strategy != "none" and not distributed.launched():
        return _launch(recipe, recipe_path, run_dir, overwrite, resume, list(overrides), log)

    rank, world = distributed.world_rank()
    if world > 1 and dist.strategy == "none":
        raise UserError(f"running as one of {world} processes but `distributed.strategy` is none; set it to ddp, fsdp "
                        "or deepspeed so the recipe says how the processes share the work")
    if rank == 0 and os.environ.get(distributed.LAUNCHED_RUN_DIR) != str(run_dir.resolve()):
        claim_run_dir(run_dir, overwrite, resume, get_last_checkpoint)
    if world > 1:
        _process_state().wait_for_everyone()  # nobody reads the run dir before rank 0 has claimed it
    checkpoint = get_last_checkpoint(str(run_dir / "checkpoints")) if resume else None
    return _train(recipe, run_dir, checkpoint, rank, log if rank == 0 else lambda *args, **kwargs: None)


def _process_state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # CPU-only machines train over gloo


def _launch(recipe: Recipe, recipe_path: Path, run_dir: Path, overwrite: bool, resume: bool, overrides: list[str],
            log) -> Path:
    """Claim the run dir here, write the launch config into it, and start the processes through accelerate."""
    import tempfile

    import torch
    from transformers.trainer_utils import get_last_checkpoint

    from finetune.modeling import resolve_dtype

    dist = recipe.distributed
    if dist.machine_rank == 0:  # other machines write nothing: their config goes to a temporary directory
        claim_run_dir(run_dir, overwrite, resume, get_last_checkpoint)
        where = run_dir
    else:
        where = Path(tempfile.mkdtemp(prefix="finetune-launch-"))
    precision = distributed.mixed_precision(dist, recipe.model.dtype, resolve_dtype(recipe.model.dtype) == torch.bfloat16)
    config = distributed.write_launch_files(dist, precision, where)
    code = distributed.launch(config, recipe_path, run_dir, overrides, resume, log)
    if code != 0:
        raise UserError(f"the distributed run stopped: its processes' errors are above (exit status {code}). It was "
                        f"launched with {config}")
    return run_dir


def _train(recipe: Recipe, run_dir: Path, checkpoint: str | None, rank: int, log) -> Path:
    from transformers import set_seed

    from finetune.data import build_datasets, save_conversations
    from finetune.methods import build_method
    from finetune.modeling import load_model, load_tokenizer, resolve_attention, resolve_dtype, resolve_model_path
    from finetune.report import plot_loss, start_summary

    t, d, m = recipe.train, recipe.data, recipe.model
    set_seed(t.seed)

    # The method first: its own checks (QLoRA without CUDA, ...) fail before anything heavy loads.
    method = build_method(recipe.method)
    load_kwargs = method.load_kwargs()

    model_path = resolve_model_path(m.name_or_path, log)
    tokenizer, added_tokens = load_tokenizer(model_path, m.trust_remote_code)
    data = build_datasets(
        tokenizer, train=d.train, train_split=d.train_split, eval=d.eval, eval_split=d.eval_split,
        eval_fraction=d.eval_fraction, format=d.format, max_length=d.max_length,
        max_bad_fraction=d.max_bad_fraction, seed=t.seed, log=log,
    )
    if rank == 0:
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
        save_conversations(data.eval_conversations, run_dir / "held_out.jsonl")

    dtype, attention = resolve_dtype(m.dtype), resolve_attention(m.attn_implementation)
    model = load_model(model_path, dtype, attention, m.trust_remote_code, vocab_size=len(tokenizer), **load_kwargs)
    model = method.prepare(model, added_tokens)

    args = _trainer_args(recipe, run_dir, dtype)
    for label, value in start_summary(
        model=model, method=method.name, dtype=dtype, attention=attention, batch_size=t.batch_size,
        accumulation=t.gradient_accumulation_steps, world_size=args.world_size, max_length=d.max_length,
        mean_tokens=data.mean_train_tokens, train_rows=len(data.train),
        eval_rows=len(data.eval) if data.eval is not None else 0, run_dir=run_dir,
    ):
        log(f"[bold]{label:>26}[/bold]  {value}")

    trainer = _make_trainer(model, args, data, tokenizer, method, run_dir / "metrics.jsonl")
    engaged = {"fsdp": trainer.is_fsdp_enabled, "deepspeed": trainer.is_deepspeed_enabled}
    if not engaged.get(recipe.distributed.strategy, True):  # never a silent fallback to another strategy
        raise UserError(f"distributed.strategy {recipe.distributed.strategy} did not engage in accelerate here")
    trainer.train(resume_from_checkpoint=checkpoint)
    if data.eval is not None:
        trainer.evaluate()

    final = run_dir / method.artifact
    if trainer.is_fsdp_enabled:  # checkpoints may be sharded; the final weights are one standard checkpoint
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(final))  # every rank takes part (sharded weights are gathered); rank 0 writes
    if rank == 0:
        tokenizer.save_pretrained(final)
        _write_run_info(run_dir, m.name_or_path, model_path, method, trainer.state.global_step)
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
        log(f"[green]done:[/green] {final} ({trainer.state.global_step} steps); metrics in {run_dir / 'metrics.jsonl'}")
    if args.world_size > 1:
        trainer.accelerator.wait_for_everyone()
        close_process_group(trainer.model_wrapped)
    return run_dir


def close_process_group(wrapped_model) -> None:
    """Every rank closes its process group before it returns, in an order that cannot deadlock.

    Left to interpreter exit, gloo's worker threads sometimes outlive it and the rank aborts ("terminate called
    without an active exception", status -6). Destroyed carelessly it hangs: if DDP's C++ Reducer holds the last
    reference to the group, the group's destructor runs with the GIL held while a gloo thread waits for the GIL
    to free a finished collective's tensors. Python-side references release the GIL when they destroy a group,
    so the Reducer goes first, while the group is still registered, and the registry's reference goes last.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped_model, DistributedDataParallel):
        wrapped_model.logger = wrapped_model.reducer = None  # the logger holds the Reducer too
    if dist.is_initialized():
        dist.destroy_process_group()


def claim_run_dir(run_dir: Path, overwrite: bool, resume: bool, get_last_checkpoint) -> str | None:
    """Make the run dir ours without losing anything; return the checkpoint to resume from, if any."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; choose one")
    busy = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        checkpoints = run_dir / "checkpoints"
        last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
        if last is None:
            raise UserError(f"--resume: no checkpoint in {checkpoints}; nothing to resume")
        return last
    if busy and not overwrite:
        raise UserError(f"run dir {run_dir} is not empty; pass --overwrite to replace it, --resume to continue it, "
                        "or --output to pick another directory")
    if busy:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def _trainer_args(recipe: Recipe, run_dir: Path, dtype):
    import torch
    from trl import SFTConfig

    t, d = recipe.train, recipe.data
    dist = recipe.distributed
    precision = distributed.mixed_precision(dist, recipe.model.dtype, dtype == torch.bfloat16)
    strategy = {
        "activation_checkpointing": recipe.model.gradient_checkpointing,
        **distributed.trainer_kwargs(dist, recipe.method.name, recipe.model.gradient_checkpointing),
    }
    return SFTConfig(
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
        max_length=d.max_length,  # rows are already cut to this; TRL's own truncation is then a no-op
        packing=t.packing,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        **strategy,
    )


#: Vocabulary entries per LM-head tile when TRL's fused loss runs its torch fallback (no Triton, e.g. CPU).
CPU_LM_HEAD_TILE = 8192


def _narrow_cpu_lm_head_tiles() -> None:
    """TRL 1.16's fused LM head sizes its tiles (32768 vocabulary entries) for its Triton kernel; its torch
    fallback holds about nine fp32 tiles at once, ~1.2 GB at 1024 tokens on SmolLM2's 49k vocabulary, more than
    the model's weights. Narrower tiles give the same per-token log-probabilities with a quarter of that memory and
    fewer cache misses (scripts/bench.py compares both). TRL reads the width from this module global at each call;
    CUDA keeps TRL's own."""
    import torch
    import trl.trainer.utils as trl_utils

    if not torch.cuda.is_available() and hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_LM_HEAD_TILE


def _make_trainer(model, args, data, tokenizer, method, metrics_path: Path):
    from trl import SFTTrainer

    from finetune.report import MetricsLogger

    _narrow_cpu_lm_head_tiles()

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

    optimizers = method.optimizers(model, args.learning_rate, args.weight_decay, args.max_grad_norm) or (None, None)
    return Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        optimizers=optimizers,
        callbacks=[*method.callbacks(), MetricsLogger(metrics_path)],  # methods may add to the logs first
    )


def weights_hash(model_dir: str) -> str | None:
    """sha256 over a local checkpoint's weight files, so `merge` can prove it found the same base."""
    files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _write_run_info(run_dir: Path, name_or_path: str, model_path: str, method, steps: int) -> None:
    info = {
        "base_model": name_or_path,
        "base_model_path": str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
        "base_weights_sha256": weights_hash(model_path),
        "method": method.name,
        "artifact": method.artifact,
        "steps": steps,
        "finetune_version": __version__,
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")
