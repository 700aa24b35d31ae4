"""The training flow, in phases: tokenizer -> data (the objective's) -> model (the method's) -> trainer -> fit
-> finish.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune import __version__
from finetune.errors import RunStopped, UserError
from finetune.models.load import check_sources
from finetune.recipe.schema import Recipe
from finetune.run import distributed, rundir
from finetune.run.arguments import trainer_args
from finetune.run.rundir import weights_hash
from finetune.run.startup import StartupClock


@dataclass
class Hooks:
    """Seams for tools that watch a run (benchmarks/measure.py's timings and memory, tests) instead of patching."""

    #: Loads the model in place of finetune.models.load.load_model, with its arguments (a benchmark's random
    #: weights from a config, or a memory reading taken just before the weights load).
    load_model: Callable[..., Any] | None = None
    #: Called with the built trainer and method before training starts (to add callbacks, wrap modules).
    on_trainer: Callable[[Any, Any], None] | None = None
    #: Loads a vision-language model's processor in place of finetune.models.vision.load_processor (tests build
    #: processors in memory: transformers' loader insists on fast image or video processors, which need
    #: torchvision).
    load_processor: Callable[..., Any] | None = None


@dataclass
class Run:
    """What the phases of one process's run share."""

    recipe: Recipe
    run_dir: Path
    checkpoint: str | None  # the complete checkpoint it resumes from
    rank: int  # global rank: 0 writes the run dir
    log: Callable
    resume_command: str
    hooks: Hooks
    clock: StartupClock


@dataclass
class Tokens:
    """The tokenizer side of the run: where the model is, its tokenizer and the chat template it trains with."""

    model_path: str
    tokenizer: Any
    added_tokens: list[int]  # ids the template needed added (their embeddings train)
    template: Any  # None for a vision-language model: its processor's template renders the rows
    processor: Any = None  # a vision-language model's processor (images, tokenizer and chat template)


def run_dir_for(recipe: Recipe, recipe_path: Path, output: Path | None = None) -> Path:
    return Path(output or recipe.train.output_dir or Path("runs") / Path(recipe_path).stem)


def run_training(recipe: Recipe, recipe_path: Path, output: Path | None = None, overwrite: bool = False,
                 resume: bool = False, log=print, overrides: list[str] = (), hooks: Hooks | None = None,
                 fit: dict | None = None) -> Path:
    """`fit`: what `--fit` chose and why (finetune.plan.fit.Fit.record), kept in run.json."""
    clock = StartupClock()
    run_dir = run_dir_for(recipe, recipe_path, output)
    recipe.data.require_rows("finetune train")
    check_sources(recipe)  # the model and hub names, before a run dir is claimed
    dist = recipe.distributed
    distributed.check_runtime(dist)
    if dist.strategy != "none" and not distributed.launched():
        return distributed.launch_run(recipe, recipe_path, run_dir, overwrite, resume, list(overrides), log,
                                      recipe.local_inputs())

    rank, world = distributed.world_rank()
    if world > 1 and dist.strategy == "none":
        raise UserError(f"running as one of {world} processes but `distributed.strategy` is none; set it to ddp, fsdp "
                        "or deepspeed so the recipe says how the processes share the work")
    if rank == 0 and os.environ.get(distributed.LAUNCHED_RUN_DIR) != str(run_dir.resolve()):
        rundir.claim(run_dir, recipe.model_dump(mode="json"), overwrite, resume, log, recipe.local_inputs())
        if fit is not None and not resume:
            rundir.write_run_info(run_dir, fit=fit)
    if world > 1:
        distributed.process_state().wait_for_everyone()  # nobody reads the run dir before rank 0 has claimed it
    checkpoint = rundir.last_complete_checkpoint(run_dir / "checkpoints", log=lambda *_: None) if resume else None
    command = shlex.join(["finetune", "train", str(recipe_path), *[a for o in overrides for a in ("--set", o)],
                          "--output", str(run_dir), "--resume"])
    quiet = log if rank == 0 else lambda *args, **kwargs: None
    try:
        return _train(Run(recipe, run_dir, checkpoint, rank, quiet, command, hooks or Hooks(), clock))
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


def _train(run: Run) -> Path:
    """One process's run, in phases: tokenizer, data, model, trainer; fit; finish."""
    from transformers import set_seed

    from finetune.data.cache import read_only_entries
    from finetune.methods import build_method

    _load_libraries()
    run.clock.mark("imports")
    set_seed(run.recipe.train.seed)
    # The method first: its own checks (QLoRA without CUDA, ...) fail before anything heavy loads.
    method = build_method(run.recipe.method)
    load_kwargs = method.load_kwargs()
    tokens = _setup_tokenizer(run)
    data = _setup_data(run, tokens)
    model, dtype, attention = _setup_model(run, method, tokens, load_kwargs)
    with read_only_entries():  # the trainers' own dataset caches stay out of the shared prepared-data entry
        trainer, guard, stop = _setup_trainer(run, method, model, dtype, attention, data, tokens)
        stopped_early = _fit(run, trainer, method, guard, stop, has_eval=data.eval is not None)
        return _finish(run, trainer, method, tokens, data, guard, stop, stopped_early)


#: What a run imports before its first phase (TRL and transformers underneath), loaded at once so that the start-up
#: breakdown shows the imports as one phase instead of spreading them over the phases that first use them.
_TRAINING_STACK = ("finetune.data.prepare", "finetune.models.load", "finetune.run.card", "finetune.run.console",
                   "finetune.run.guards", "finetune.run.report", "finetune.run.trackers", "finetune.run.trainer")


def _load_libraries() -> None:
    import importlib

    for name in _TRAINING_STACK:
        importlib.import_module(name)
    from finetune.run.console import quiet_weight_bars

    quiet_weight_bars()


def _setup_tokenizer(run: Run) -> Tokens:
    from finetune.data.text import raw_text_template
    from finetune.models.load import (
        load_tokenizer,
        resolve_model_path,
        saved_tokenizer,
        template_for,
        with_pad_token,
    )
    from finetune.models.vision import is_vision_language, load_processor, vision_recipe_problems
    from finetune.recipe.text import known_text

    m, d = run.recipe.model, run.recipe.data
    model_path = resolve_model_path(m.name_or_path, run.log)
    if is_vision_language(model_path):
        processor = (run.hooks.load_processor or load_processor)(model_path, m.trust_remote_code)
        problems = vision_recipe_problems(run.recipe)
        if problems:
            raise UserError("; ".join(problems))
        with_pad_token(processor.tokenizer)
        run.log(f"vision-language model: {type(processor).__name__}'s chat template and image processing")
        return Tokens(model_path, processor.tokenizer, [], None, processor)
    if all(known_text(s.path, s.format) for s in d.train_sources()) and d.chat_template == "auto":
        tokenizer = with_pad_token(saved_tokenizer(model_path, m.trust_remote_code))  # no ChatML markers added
        run.log("raw text: no chat template (documents train as they are, every token)")
        return Tokens(model_path, tokenizer, [], raw_text_template(tokenizer))
    tokenizer, added_tokens = load_tokenizer(model_path, m.trust_remote_code, d.chat_template)
    template = template_for(tokenizer, d.chat_template, d.fold_system, m.name_or_path)
    run.log(f"chat template: {template.name}, end of turn {template.end_of_turn}")
    return Tokens(model_path, tokenizer, added_tokens, template)


def _setup_data(run: Run, tokens: Tokens):
    """The objective's prepared data; rank 0 records the resolved recipe and the held-out rows."""
    if tokens.processor is not None:
        data = run.recipe.objective.build_vision_data(run.recipe, tokens.processor, run.log)
    else:
        data = run.recipe.objective.build_data(run.recipe, tokens.tokenizer, tokens.template, run.log)
    if data.cache_line:
        run.log(data.cache_line)
    if len(data.mix) > 1:
        run.log("training mix: " + "; ".join(data.mix_lines()))
    if run.rank == 0:
        _record_recipe(run.run_dir, run.recipe.model_dump(mode="json"), run.checkpoint, run.log)
        data.save_held_out(run.run_dir / "held_out.jsonl")
    run.clock.mark("data")
    return data


def _setup_model(run: Run, method, tokens: Tokens, load_kwargs: dict):
    from finetune.models.load import load_model, resolve_attention, resolve_dtype
    from finetune.models.vision import freeze_vision_tower, load_vision_model

    m = run.recipe.model
    dtype, attention = resolve_dtype(m.dtype), resolve_attention(m.attn_implementation)
    if tokens.processor is not None:
        model = (run.hooks.load_model or load_vision_model)(tokens.model_path, dtype, attention, m.trust_remote_code,
                                                             **load_kwargs)
    else:
        load = run.hooks.load_model or load_model
        model = load(tokens.model_path, dtype, attention, m.trust_remote_code, vocab_size=len(tokens.tokenizer),
                     **load_kwargs)
    model = method.prepare(model, tokens.added_tokens)
    if tokens.processor is not None and not m.train_vision_tower:
        frozen = freeze_vision_tower(model)
        if frozen:
            run.log(f"vision tower frozen ({frozen:,} parameters; model.train_vision_tower trains it)")
    run.clock.mark("model")
    return model, dtype, attention


def _setup_trainer(run: Run, method, model, dtype, attention, data, tokens: Tokens):
    """The objective's trainer with finetune's callbacks (checkpoint marks, schedule, divergence, signals)."""
    from finetune.run.console import quiet_internal_passes, replace_progress
    from finetune.run.guards import DivergenceGuard, MarkCheckpointsComplete, StopOnSignal
    from finetune.run.trackers import RecipeToTrackers
    from finetune.run.trainer import ContinueSchedule

    recipe, t = run.recipe, run.recipe.train
    args = trainer_args(recipe, run.run_dir, dtype)
    _start_summary(run, model, method, dtype, attention, args, data)
    with quiet_internal_passes():
        trainer = _make_trainer(recipe.objective, model, args, data, tokens, method, run.run_dir / "metrics.jsonl",
                                t.token_metrics, t.chunked_loss, recipe.data)
    replace_progress(trainer, run.log)
    engaged = {"fsdp": trainer.is_fsdp_enabled, "deepspeed": trainer.is_deepspeed_enabled}
    if not engaged.get(recipe.distributed.strategy, True):  # never a silent fallback to another strategy
        raise UserError(f"distributed.strategy {recipe.distributed.strategy} did not engage in accelerate here")
    guard, stop = DivergenceGuard(run.log), StopOnSignal(run.log)
    if t.report_to:
        trainer.add_callback(RecipeToTrackers(recipe.model_dump(mode="json"), trainer))
    if t.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    for callback in (MarkCheckpointsComplete(), ContinueSchedule(), guard, stop):
        trainer.add_callback(callback)
    run.clock.mark("trainer")
    trainer.add_callback(run.clock.callback(run.log, run.run_dir if run.rank == 0 else None))
    if run.hooks.on_trainer is not None:
        run.hooks.on_trainer(trainer, method)
    return trainer, guard, stop


def _start_summary(run: Run, model, method, dtype, attention, args, data) -> None:
    """What a user needs to trust the run, printed before the trainer is built (derived quantities included)."""
    from rich.markup import escape

    from finetune.run.report import start_summary

    recipe, t, d, log = run.recipe, run.recipe.train, run.recipe.data, run.log
    for label, value in start_summary(
        model=model, method=method.name, dtype=dtype, attention=attention, batch_size=t.batch_size,
        accumulation=t.gradient_accumulation_steps, world_size=args.world_size,
        max_length=d.max_length * recipe.objective.sequences_per_row,  # a pair is two sequences
        mean_tokens=data.mean_train_tokens, train_rows="streamed" if data.streaming else len(data.train),
        eval_rows=len(data.eval) if data.eval is not None else len(getattr(data, "held_out_prompts", ())),
        run_dir=run.run_dir, unit=recipe.objective.batch_unit,
    ):
        log(f"[bold]{label:>26}[/bold]  {value}")
    log(f"[bold]{'start-up so far':>26}[/bold]  {run.clock.line()}")
    if data.truncated:
        log(f"[yellow]warning: {data.truncated} of {len(data.train)} training samples are cut at data.max_length="
            f"{d.max_length}; what lies past it (an answer's end, its end-of-turn token) is not trained. `finetune "
            "data` shows them[/yellow]")
    for line in getattr(data, "text_lines", lambda *_: [])(d.max_length, d.overlap):
        log(escape(line))
    if getattr(data, "text", None) and not t.packing and not data.streaming:
        log("[yellow]warning: raw text without train.packing: each block is padded to its batch's longest instead "
            "of packed with others into max_length; set train.packing: true (documents still never attend to each "
            "other)[/yellow]")
    train_rows = 0 if data.streaming else len(data.train)
    for line in recipe.objective.start_lines(recipe, train_rows):
        log(line)


def _fit(run: Run, trainer, method, guard, stop, has_eval: bool) -> bool:
    """Train (or finish from a checkpoint at the last step), evaluate and save the final weights; whether the run
    stopped early (diverged, or a signal before the last step)."""
    from finetune.run.trainer import CheckpointWriteError

    max_steps = run.recipe.train.max_steps
    try:
        if run.checkpoint is not None and max_steps and rundir.checkpoint_step(run.checkpoint) >= max_steps:
            _finish_from(trainer, run.checkpoint)
        else:
            trainer.train(resume_from_checkpoint=run.checkpoint)
        stopped_early = guard.diverged or (stop.requested and trainer.state.global_step < trainer.state.max_steps)
        if not stopped_early:
            if has_eval and not _evaluated_at_last_step(trainer):
                trainer.evaluate()
            if trainer.is_fsdp_enabled:  # checkpoints may be sharded; the final weights are one standard checkpoint
                trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
            # every rank takes part (sharded weights are gathered); rank 0 writes
            _save_final(trainer, method, run.run_dir / method.artifact)
    except CheckpointWriteError as err:
        raise rundir.write_failure(err.path, err.cause, run.run_dir, run.resume_command, run.rank) from None
    finally:
        stop.restore()
    return stopped_early


def _finish(run: Run, trainer, method, tokens: Tokens, data, guard, stop, stopped_early: bool) -> Path:
    """The loss plot, and either the finished run's files or the message that says how it stopped."""
    from finetune.run.guards import diverged_error
    from finetune.run.report import plot_loss

    t, step = run.recipe.train, trainer.state.global_step
    if t.early_stopping_patience and trainer.state.best_model_checkpoint and run.rank == 0:
        run.log(f"early stopping: the best held-out loss, {trainer.state.best_metric:.4f}, was at "
                f"{Path(trainer.state.best_model_checkpoint).name}; the final weights are that checkpoint's")
    if run.rank == 0:
        plot_loss(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
    stopped = None
    if guard.diverged:
        stopped = diverged_error(run.run_dir, guard.diverged, t.learning_rate, run.recipe.method.name, run.rank)
    elif stopped_early:
        if run.rank == 0:
            rundir.write_run_info(run.run_dir, status="interrupted", stopped_at_step=step,
                                  resume_command=run.resume_command)
        stopped = RunStopped(f"{stop.requested}: stopped after step {step} with a checkpoint at "
                             f"{run.run_dir / 'checkpoints' / f'checkpoint-{step}'}; continue with: "
                             f"{run.resume_command}", exit_code=RunStopped.INTERRUPTED)
    elif run.rank == 0:
        _write_finished(run, method, tokens, data, guard.warnings, step)
    if trainer.args.world_size > 1:  # rank 0 has written everything before any rank exits (a launcher ends the rest)
        trainer.accelerator.wait_for_everyone()
        distributed.close_process_group(trainer.model_wrapped)
    if stopped is not None:
        raise stopped
    return run.run_dir


def _write_finished(run: Run, method, tokens: Tokens, data, warnings: list[str], step: int) -> None:
    """Beside the final weights: the trained tokenizer and generation config, run.json, the model card."""
    from finetune.models.load import write_generation_config
    from finetune.models.registry import resolvable_base
    from finetune.run.card import name_adapter_base, write_model_card

    final, m, model_path = run.run_dir / method.artifact, run.recipe.model, tokens.model_path
    # with the chat template that was trained (a processor saves its tokenizer, image processor and template)
    (tokens.processor or tokens.tokenizer).save_pretrained(final)
    write_generation_config(final, tokens.tokenizer, model_path)  # generate() stops on the trained end of turn
    rundir.write_run_info(
        run.run_dir, drop=("stopped_at_step", "resume_command", "diverged_at_step", "reason"), status="complete",
        base_model=m.name_or_path,
        base_model_path=str(Path(model_path).resolve()) if Path(model_path).exists() else model_path,
        base_weights_sha256=weights_hash(model_path), method=method.name, objective=run.recipe.objective.name,
        artifact=method.artifact, steps=step, data=[{"source": mix["source"], "rows": mix["rows"]} for mix in data.mix],
        finetune_version=__version__, warnings=warnings,
    )
    if method.artifact == "adapter":  # a base others can resolve; run.json keeps this machine's path
        name_adapter_base(final, resolvable_base(m.name_or_path))
    write_model_card(run.run_dir, final)
    for warning in warnings:
        run.log(f"[yellow]warning: {warning}[/yellow]")
    run.log(f"[green]done:[/green] {final} ({step} steps); metrics in {run.run_dir / 'metrics.jsonl'}")


def _evaluated_at_last_step(trainer) -> bool:
    """Whether the trainer has evaluated the final weights already: with `train.eval_steps`, transformers evaluates
    at the last step too (DefaultFlowCallback), and a second pass over the held-out rows would cost as much again."""
    step = trainer.state.global_step
    return any("eval_loss" in entry and entry.get("step") == step for entry in trainer.state.log_history)


def _finish_from(trainer, checkpoint: str) -> None:
    """The checkpoint is the run's last step (a finished run whose final save failed, or one resumed as it was):
    load its weights and state instead of training, which would take one step past max_steps."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint)  # pinned in tests/run/test_trainer.py
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
        truncate_metrics(run_dir / "completions.jsonl", step)  # objective grpo's sample, logged again likewise
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


def _make_trainer(options, model, args, data, tokens: Tokens, method, metrics_path: Path, token_metrics: bool,
                  chunked_loss: bool | None, data_options):
    from finetune.objectives import OBJECTIVES
    from finetune.run.report import MetricsLogger

    optimizers = method.optimizers(model, args.learning_rate, args.weight_decay, args.max_grad_norm) or (None, None)
    collator = None
    if tokens.processor is not None:
        from finetune.data.vision_data import VisionCollator
        from finetune.data.vision_pairs import VisionPairCollator

        kind = VisionPairCollator if options.data_kind == "preference" else VisionCollator
        collator = kind(tokens.processor, data_options.image_max_pixels, data_options.image_min_pixels)
        args.remove_unused_columns = False  # the collator reads the rows' text and image references
    return OBJECTIVES[options.name].build_trainer(
        options, model=model, args=args, train=data.train, eval=data.eval, tokenizer=tokens.tokenizer,
        optimizers=optimizers, template=tokens.template,
        callbacks=[*method.callbacks(), MetricsLogger(metrics_path)],  # methods may add to the logs first
        token_metrics=token_metrics, chunked_loss=chunked_loss, data_collator=collator,
    )
