"""What a run prints while it trains: one progress line (step/total, loss, learning rate, tokens/s, ETA, peak memory)
instead of transformers' printed log dicts, the evaluations as a small table, and the libraries' progress bars for
internal passes hidden unless `--debug` (FINETUNE_DEBUG). metrics.jsonl is written apart (finetune.run.report).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager

from transformers import TrainerCallback


def debugging() -> bool:
    return bool(os.environ.get("FINETUNE_DEBUG"))


def quiet_weight_bars() -> None:
    """transformers' and the hub's progress bars (loading, writing weight shards): noise around the summary."""
    if debugging():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging

    logging.disable_progress_bar()
    disable_progress_bars()


@contextmanager
def quiet_internal_passes():
    """TRL's and datasets' bars for passes inside the trainer's construction (the reference log-probabilities,
    dataset maps), hidden unless debugging; the training flow says in one line what is being computed."""
    if debugging():
        yield
        return
    import datasets

    was_on, before = datasets.is_progress_bar_enabled(), os.environ.get("TQDM_DISABLE")
    datasets.disable_progress_bars()
    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference pass reads it for its bar
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before
        if was_on:
            datasets.enable_progress_bars()


def _format(value: float) -> str:
    if not math.isfinite(value):  # a diverged step's loss: the guard stops the run and says why
        return str(value)
    if value == int(value) and abs(value) >= 1:  # counts (tokens, rows)
        return f"{int(value):,}"
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


class ProgressLine(TrainerCallback):
    """Replaces transformers' ProgressCallback/PrinterCallback on rank 0. On a terminal the line updates in place;
    elsewhere (CI logs, files) it is printed once per logging step."""

    def __init__(self, log, live: bool | None = None):
        from rich import get_console

        self.log, self.console = log, get_console()
        self.live = self.console.is_terminal if live is None else live
        self.progress = self.task = None
        self.fields = {"loss": "-", "lr": "-", "tokens": "-", "memory": "-", "rl": ""}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.start, self.start_step, self.tokens_at = time.perf_counter(), state.global_step, None
        if self.live:
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(bar_width=20),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tokens]} tok/s  peak "
                           "{task.fields[memory]}{task.fields[rl]}"), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, transient=False)
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                               **self.fields)
            self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        from finetune.run.report import peak_memory_gb

        now = time.perf_counter()
        seen = state.num_input_tokens_seen
        if self.tokens_at is not None and now > self.tokens_at[0]:
            self.fields["tokens"] = f"{(seen - self.tokens_at[1]) / (now - self.tokens_at[0]):,.0f}"
        self.tokens_at = (now, seen)
        self.fields.update(loss=_format(logs["loss"]), lr=f"{logs.get('learning_rate', 0):.2e}",
                           memory=f"{peak_memory_gb():.1f} GiB", rl=rl_fields(logs))
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, **self.fields)
            return
        done = max(state.global_step - self.start_step, 1)
        left = (now - self.start) / done * (state.max_steps - state.global_step)
        self.log(f"step {state.global_step}/{state.max_steps}  loss {self.fields['loss']}  lr {self.fields['lr']}  "
                 f"{self.fields['tokens']} tok/s  ETA {time.strftime('%H:%M:%S', time.gmtime(left))}  peak "
                 f"{self.fields['memory']}{self.fields['rl']}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics:
            return
        from rich.table import Table

        table = Table(title=f"held-out evaluation at step {state.global_step}", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not key.endswith(("_runtime", "_per_second", "epoch")):
                table.add_row(key.removeprefix("eval_"), _format(float(value)))
        if self.progress is not None:
            self.progress.console.print(table)
        else:
            self.log(table)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if state.is_world_process_zero:
            self.log(f"trained {state.global_step - self.start_step} steps in {time.perf_counter() - self.start:.1f} s")


def rl_fields(logs: dict) -> str:
    """What an online-RL step adds to the line (objective grpo, TRL's metric names): the reward's mean and std,
    each function's mean, the completions' mean length and the KL to the reference when there is one."""
    if logs.get("reward") is None:
        return ""
    per_function = [f"{key[len('rewards/'):-len('/mean')]} {value:.2f}" for key, value in logs.items()
                    if key.startswith("rewards/") and key.endswith("/mean") and value is not None]
    line = f"  reward {logs['reward']:.3f} ± {logs.get('reward_std') or 0:.3f} ({', '.join(per_function)})"
    if logs.get("completions/mean_length") is not None:
        line += f"  length {logs['completions/mean_length']:.0f}"
    if logs.get("kl") is not None:
        line += f"  kl {logs['kl']:.4f}"
    return line


def replace_progress(trainer, log) -> None:
    """transformers' progress bar and printed log dicts out, the progress line in."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(ProgressLine(log))
