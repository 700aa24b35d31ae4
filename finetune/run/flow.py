"""The training flow, top to bottom: recipe -> data -> model -> method -> SFTTrainer -> run dir.

A run directory holds:
  recipe.yaml       the resolved recipe (defaults and --set overrides filled in)
  run.json          written at claim time (the mark that makes the dir finetune's) with the run's status;
                    at the end, what produced the weights: base model, its resolved path and hash, method
  held_out.jsonl    the exact held-out rows, for `finetune eval`
  model/|adapter/   final weights with tokenizer (a full checkpoint, or a peft adapter)
  checkpoints/      resumable trainer checkpoints
  metrics.jsonl     one JSON object per logging step
  loss.png          the loss curve
  accelerate.yaml   (multi-process runs) the accelerate config the processes were launched with

Multi-process: `run_training` outside a launcher, with a distributed strategy, claims the run dir and starts the
processes through accelerate (finetune.run.distributed); each of them runs this same flow, and only global rank 0
writes the run dir. Under a user's own `accelerate launch`/`torchrun`, rank 0 claims the run dir itself.

A run that cannot finish stops with one message and keeps what is usable (finetune.run.guards, finetune.run.rundir):
Ctrl-C / SIGTERM saves a checkpoint at the current step and exits 130; divergence stops without saving
non-finite weights; a failed write names the path and the space needed, and the last complete checkpoint stays.
"""

from __future__ import annotations

import errno
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from finetune import __version__
from finetune.errors import RunStopped, UserError
from finetune.recipe.schema import Recipe
from finetune.run import distributed, rundir
from finetune.run.rundir import weights_hash
from finetune.run.startup import StartupClock


@dataclass
class Hooks:
    """Seams for tools that watch a run (benchmarks.measure's timings and memory, tests) instead of patching."""

    #: Called with the built trainer and method before training starts (to add callbacks, wrap modules).
    on_trainer: Callable[[Any, Any], None] | None = None


def run_training(recipe: Recipe, recipe_path: Path, output: Path | None = None, overwrite: bool = False,
                 resume: bool = False, log=print, overrides: list[str] = (), hooks: Hooks | None = None) -> Path:
    clock = StartupClock()
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
        rundir.claim(run_dir, recipe.model_dump(mode="json"), overwrite, resume, log, _inputs(recipe))
    if world > 1:
        distributed.process_state().wait_for_everyone()  # nobody reads the run dir before rank 0 has claimed it
    checkpoint = rundir.last_complete_checkpoint(run_dir / "checkpoints", log=lambda *_: None) if resume else None
    command = shlex.join(["finetune", "train", str(recipe_path), *[a for o in overrides for a in ("--set", o)],
                          "--output", str(run_dir), "--resume"])
    quiet = log if rank == 0 else lambda *args, **kwargs: None
    try:
        return _train(recipe, run_dir, checkpoint, rank, quiet, command, hooks or Hooks(), clock)
    except KeyboardInterrupt:  # before steps began, or a second Ctrl-C
        newest = rundir.last_complete_checkpoint(run_dir / "checkpoints", log=lambda *_: None)
        if rank == 0:
            rundir.write_run_info(run_dir, status="interrupted")
        go_on = f"; to continue from {newest}: {command}" if newest else "; no checkpoint was written yet"
        raise RunStopped(f"interrupted: stopped at once{go_on}", exit_code=130) from None
    except OSError as err:
        if err.errno not in _WRITE_ERRORS:
            raise
        # A full, read-only or failing volume outside a checkpoint write (run.json, held_out.jsonl, loss.png).
        raise RunStopped(f"could not read or write {err.filename or run_dir}: {err.strerror}. Make room (or fix the "
                         f"volume or its permissions), then start again: a run dir with a complete checkpoint "
                         f"continues with {command}") from None
    except BaseException:
        if rank == 0 and rundir.is_run_dir(run_dir) and rundir.read_run_info(run_dir)["status"] == "running":
            rundir.write_run_info(run_dir, status="failed")
        raise


#: errno values that mean the disk, not finetune, refused a write.
_WRITE_ERRORS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EIO", "EACCES", "EPERM")
                 if hasattr(errno, name)}


def _inputs(recipe: Recipe) -> tuple[str, ...]:
    """The local paths a run reads (its base model and data), which `--overwrite` must never delete."""
    paths = (recipe.model.name_or_path, recipe.data.eval, *(s.path for s in recipe.data.train_sources()))
    return tuple(p for p in paths if p and Path(p).expanduser().exists())


def _launch(recipe: Recipe, recipe_path: Path, run_dir: Path, overwrite: bool, resume: bool, overrides: list[str],
            log) -> Path:
    """Claim the run dir here, write the launch config into it, and start the processes through accelerate."""
    import tempfile

    import torch

    from finetune.models.load import resolve_dtype

    dist = recipe.distributed
    if dist.machine_rank == 0:  # other machines write nothing: their config goes to a temporary directory
        rundir.claim(run_dir, recipe.model_dump(mode="json"), overwrite, resume, log, _inputs(recipe))
        where = run_dir
    else:
        where = Path(tempfile.mkdtemp(prefix="finetune-launch-"))
    precision = distributed.mixed_precision(dist, recipe.model.dtype, resolve_dtype(recipe.model.dtype) == torch.bfloat16)
    config = distributed.write_launch_files(dist, precision, where)
    code = distributed.launch(config, recipe_path, run_dir, overrides, resume, log)
    if code == RunStopped.INTERRUPTED:
        raise RunStopped(f"interrupted; the processes' messages above say where to continue from ({run_dir})",
                         exit_code=code)
    if code != 0:
        raise UserError(f"the distributed run stopped: its processes' errors are above (exit status {code}). It was "
                        f"launched with {config}")
    return run_dir


def _train(recipe: Recipe, run_dir: Path, checkpoint: str | None, rank: int, log, resume_command: str,
           hooks: Hooks, clock: StartupClock) -> Path:
    from transformers import set_seed

    from finetune.data.prepare import build_datasets
    from finetune.data.rows import save_conversations
    from finetune.methods import build_method
    from finetune.models.load import (
        load_model,
        load_tokenizer,
        resolve_attention,
        resolve_dtype,
        resolve_model_path,
        template_for,
        write_generation_config,
    )
    from finetune.models.registry import resolvable_base
    from finetune.objectives import OBJECTIVES
    from finetune.run.card import name_adapter_base, write_model_card
    from finetune.run.console import (
        quiet_internal_passes,
        quiet_weight_bars,
        replace_progress,
    )
    from finetune.run.guards import (
        DivergenceGuard,
        MarkCheckpointsComplete,
        StopOnSignal,
        diverged_error,
    )
    from finetune.run.report import plot_loss, start_summary
    from finetune.run.trackers import RecipeToTrackers
    from finetune.run.trainer import CheckpointWriteError, ContinueSchedule

    clock.mark("imports")
    quiet_weight_bars()
    t, d, m = recipe.train, recipe.data, recipe.model
    set_seed(t.seed)

    # The method first: its own checks (QLoRA without CUDA, ...) fail before anything heavy loads.
    method = build_method(recipe.method)
    load_kwargs = method.load_kwargs()

    model_path = resolve_model_path(m.name_or_path, log)
    tokenizer, added_tokens = load_tokenizer(model_path, m.trust_remote_code, d.chat_template)
    template = template_for(tokenizer, d.chat_template, d.fold_system, m.name_or_path)
    log(f"chat template: {template.name}, end of turn {template.end_of_turn}")
    objective = OBJECTIVES[recipe.objective.name]
    if recipe.objective.data_kind in ("preference", "unpaired"):
        from finetune.data.preference.prepare import build_pairs, save_pairs

        [source] = d.train_sources()  # one source: the preference objectives refuse mixtures
        data = build_pairs(tokenizer, template, source.path, source.split, d.eval, d.eval_split, d.eval_fraction,
                           d.max_length, d.max_bad_fraction, t.seed, log,
                           unpaired=recipe.objective.data_kind == "unpaired", cache=d.cache, columns=source.columns)
        held_out, save_held_out = data.held_out, save_pairs
    else:
        data = build_datasets(
            tokenizer, train=d.train_sources(), train_split=d.train_split, eval=d.eval, eval_split=d.eval_split,
            eval_fraction=d.eval_fraction, format=d.format, max_length=d.max_length,
            max_bad_fraction=d.max_bad_fraction, seed=t.seed, log=log, template=template, cache=d.cache,
            num_proc=d.num_proc, streaming=d.streaming,
        )
        held_out, save_held_out = data.eval_conversations, save_conversations
    if data.cache_line:
        log(data.cache_line)
    if len(data.mix) > 1:
        log("training mix: " + "; ".join(data.mix_lines()))
    if rank == 0:
        _record_recipe(run_dir, recipe.model_dump(mode="json"), checkpoint, log)
        save_held_out(held_out, run_dir / "held_out.jsonl")
    clock.mark("data")

    dtype, attention = resolve_dtype(m.dtype), resolve_attention(m.attn_implementation)
    model = load_model(model_path, dtype, attention, m.trust_remote_code, vocab_size=len(tokenizer), **load_kwargs)
    model = method.prepare(model, added_tokens)
    clock.mark("model")

    args = _trainer_args(recipe, run_dir, dtype)
    for label, value in start_summary(
        model=model, method=method.name, dtype=dtype, attention=attention, batch_size=t.batch_size,
        accumulation=t.gradient_accumulation_steps, world_size=args.world_size,
        max_length=d.max_length * recipe.objective.sequences_per_row,  # a pair is two sequences
        mean_tokens=data.mean_train_tokens, train_rows="streamed" if data.streaming else len(data.train),
        eval_rows=len(data.eval) if data.eval is not None else 0, run_dir=run_dir,
    ):
        log(f"[bold]{label:>26}[/bold]  {value}")
    log(f"[bold]{'start-up so far':>26}[/bold]  {clock.line()}")
    if data.truncated:
        log(f"[yellow]warning: {data.truncated} of {len(data.train)} training samples are cut at data.max_length="
            f"{d.max_length}; what lies past it (an answer's end, its end-of-turn token) is not trained. `finetune "
            "data` shows them[/yellow]")

    if recipe.objective.name != "sft":
        log(f"[bold]{'objective':>26}[/bold]  {recipe.objective.summary(recipe.method)}")
    if recipe.objective.reference_for(recipe.method) == "precomputed":
        log(f"reference: computing the log-probabilities of {len(data.train)} training rows (one no-grad pass)")
    with quiet_internal_passes():
        trainer = _make_trainer(objective, recipe.objective, model, args, data, tokenizer, method,
                                run_dir / "metrics.jsonl", t.token_metrics)
    replace_progress(trainer, log)
    engaged = {"fsdp": trainer.is_fsdp_enabled, "deepspeed": trainer.is_deepspeed_enabled}
    if not engaged.get(recipe.distributed.strategy, True):  # never a silent fallback to another strategy
        raise UserError(f"distributed.strategy {recipe.distributed.strategy} did not engage in accelerate here")
    guard, stop = DivergenceGuard(log), StopOnSignal(log)
    if t.report_to:
        trainer.add_callback(RecipeToTrackers(recipe.model_dump(mode="json"), trainer))
    if t.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    for callback in (MarkCheckpointsComplete(), ContinueSchedule(), guard, stop):
        trainer.add_callback(callback)
    clock.mark("trainer")
    trainer.add_callback(clock.callback(log, run_dir if rank == 0 else None))
    if hooks.on_trainer is not None:
        hooks.on_trainer(trainer, method)
    final = run_dir / method.artifact
    try:
        if checkpoint is not None and t.max_steps and rundir.checkpoint_step(checkpoint) >= t.max_steps:
            _finish_from(trainer, checkpoint)
        else:
            trainer.train(resume_from_checkpoint=checkpoint)
        stopped_early = guard.diverged or (stop.requested and trainer.state.global_step < trainer.state.max_steps)
        if not stopped_early:
            if data.eval is not None:
                trainer.evaluate()
            if trainer.is_fsdp_enabled:  # checkpoints may be sharded; the final weights are one standard checkpoint
                trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
            _save_final(trainer, method, final)  # every rank takes part (sharded weights are gathered); rank 0 writes
    except CheckpointWriteError as err:
        raise rundir.write_failure(err.path, err.cause, run_dir, resume_command, rank) from None
    finally:
        stop.restore()
    step = trainer.state.global_step
    if t.early_stopping_patience and trainer.state.best_model_checkpoint and rank == 0:
        log(f"early stopping: the best held-out loss, {trainer.state.best_metric:.4f}, was at "
            f"{Path(trainer.state.best_model_checkpoint).name}; the final weights are that checkpoint's")
    if rank == 0:
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
    stopped = None
    if guard.diverged:
        stopped = diverged_error(run_dir, guard.diverged, t.learning_rate, recipe.method.name, rank)
    elif stopped_early:
        if rank == 0:
            rundir.write_run_info(run_dir, status="interrupted", stopped_at_step=step, resume_command=resume_command)
        stopped = RunStopped(f"{stop.requested}: stopped after step {step} with a checkpoint at "
                             f"{run_dir / 'checkpoints' / f'checkpoint-{step}'}; continue with: {resume_command}",
                             exit_code=RunStopped.INTERRUPTED)
    elif rank == 0:
        tokenizer.save_pretrained(final)  # with the chat template that was trained
        write_generation_config(final, tokenizer, model_path)  # generate() stops on the trained end of turn
        rundir.write_run_info(
            run_dir, drop=("stopped_at_step", "resume_command", "diverged_at_step", "reason"), status="complete",
            base_model=m.name_or_path,
            base_model_path=str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
            base_weights_sha256=weights_hash(model_path), method=method.name, objective=recipe.objective.name,
            artifact=method.artifact, steps=step, data=[{"source": mix["source"], "rows": mix["rows"]} for mix in data.mix],
            finetune_version=__version__, warnings=guard.warnings,
        )
        if method.artifact == "adapter":  # a base others can resolve; run.json keeps this machine's path
            name_adapter_base(final, resolvable_base(m.name_or_path))
        write_model_card(run_dir, final)
        for warning in guard.warnings:
            log(f"[yellow]warning: {warning}[/yellow]")
        log(f"[green]done:[/green] {final} ({step} steps); metrics in {run_dir / 'metrics.jsonl'}")
    if args.world_size > 1:  # rank 0 has written everything before any rank exits (a launcher ends the rest then)
        trainer.accelerator.wait_for_everyone()
        distributed.close_process_group(trainer.model_wrapped)
    if stopped is not None:
        raise stopped
    return run_dir


def _finish_from(trainer, checkpoint: str) -> None:
    """The checkpoint is the run's last step (a finished run whose final save failed, or one resumed as it was):
    load its weights and state instead of training, which would take one step past max_steps."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint)  # pinned in tests/test_trainer.py
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))


def _record_recipe(run_dir: Path, resolved: dict, checkpoint: str | None, log) -> None:
    """Write the resolved recipe; on resume, first record what changed (old values kept in run.json) and drop the
    metric lines logged after the checkpoint, which the resumed run logs again."""
    from finetune.run.report import truncate_metrics

    path = run_dir / "recipe.yaml"
    if checkpoint is not None:
        step = rundir.checkpoint_step(checkpoint)
        changes = rundir.recipe_changes(yaml.safe_load(path.read_text()) or {}, resolved)
        resumes = rundir.read_run_info(run_dir).get("resumes", [])
        resumes.append({"checkpoint": Path(checkpoint).name, "step": step,
                        "changed": {key: {"was": old, "now": new} for key, (old, new) in changes.items()}})
        rundir.write_run_info(run_dir, status="running", resumes=resumes)
        dropped = truncate_metrics(run_dir / "metrics.jsonl", step)
        if dropped:
            log(f"resume: dropped {dropped} metric line(s) logged after step {step}; those steps run again")
        if {"train.max_steps", "train.epochs"} & changes.keys():
            log("resume: the run's length changed, so the learning-rate schedule is rebuilt for the new length: from "
                f"step {step} on the LR is what a run of the new length has at that step")
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))


def _save_final(trainer, method, final: Path) -> None:
    from safetensors import SafetensorError

    from finetune.run.trainer import CheckpointWriteError

    try:
        method.save(trainer, final)
    except (OSError, RuntimeError, SafetensorError) as err:
        raise CheckpointWriteError(final, err) from err


def _trainer_args(recipe: Recipe, run_dir: Path, dtype):
    """The objective's trainer config (TRL's SFTConfig, DPOConfig): the arguments every objective shares, and its own."""
    from finetune.objectives import OBJECTIVES

    return OBJECTIVES[recipe.objective.name].trainer_args(
        recipe.objective, recipe.method, _common_args(recipe, run_dir, dtype), max_length=recipe.data.max_length,
        packing=recipe.train.packing)


def _common_args(recipe: Recipe, run_dir: Path, dtype) -> dict:
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


def _make_trainer(objective, options, model, args, data, tokenizer, method, metrics_path: Path, token_metrics: bool):
    from finetune.run.report import MetricsLogger

    optimizers = method.optimizers(model, args.learning_rate, args.weight_decay, args.max_grad_norm) or (None, None)
    return objective.build_trainer(
        options, model=model, args=args, train=data.train, eval=data.eval, tokenizer=tokenizer,
        optimizers=optimizers,
        callbacks=[*method.callbacks(), MetricsLogger(metrics_path)],  # methods may add to the logs first
        token_metrics=token_metrics,
    )
