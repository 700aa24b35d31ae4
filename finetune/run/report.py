"""What a run tells its user: the start-of-run summary, metrics.jsonl and loss.png."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from transformers import TrainerCallback


def peak_memory_gb() -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, else peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


#: Prefixes of the metrics TRL's DPO and KTO trainers log for training and held-out rows (KTO adds `kl`).
PREFERENCE_METRICS = ("rewards/", "logps/", "eval_rewards/", "eval_logps/")
#: Online RL's (objective grpo, TRL's names and finetune's time split): the weighted reward, its spread, the
#: completions' lengths, the clipped share of tokens and the seconds of each part of a step.
RL_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "completions/", "clip_ratio/region_mean", "time/")


class MetricsLogger(TrainerCallback):
    """Appends one JSON object per log event to metrics.jsonl (step, loss, lr, grad_norm, tokens/s, memory)."""

    def __init__(self, path: Path):
        self.path = path
        self._last_time = None
        self._last_tokens = 0
        self._last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen
        self._last_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.perf_counter()
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm", "mean_token_accuracy", "entropy", "train_loss",
                    "active_layers", "active_layers_by_rank"):
            if key in logs:
                record["lr" if key == "learning_rate" else key] = logs[key]
        # A preference objective's rewards (beta x log-ratio to the reference) and log-probabilities, TRL's names.
        record.update({k: v for k, v in logs.items() if k.startswith(PREFERENCE_METRICS) or k in ("kl", "eval_kl")})
        record.update({k: v for k, v in logs.items() if k.startswith(RL_METRICS)})
        if "loss" in logs:
            tokens = state.num_input_tokens_seen - self._last_tokens
            elapsed = max(now - self._last_time, 1e-9)
            record["tokens_per_s"] = tokens / elapsed
            record["step_seconds"] = elapsed / max(state.global_step - self._last_step, 1)
            self._last_time, self._last_tokens = now, state.num_input_tokens_seen
            self._last_step = state.global_step
        record["peak_memory_gb"] = round(peak_memory_gb(), 3)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop the lines logged after `last_step` (a resumed run logs those steps again) and the end-of-run summary
    an interrupted run wrote at it (the resumed run writes its own); return how many."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if (record := json.loads(line))["step"] < last_step or
            (record["step"] == last_step and "train_loss" not in record)]
    if len(kept) < len(lines):
        from finetune.paths import write_atomic

        write_atomic(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out: Path) -> None:
    """The loss curve; runs that learn from rewards (objective grpo) get their reward curve beside it."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    rewarded = any(r.get("reward") is not None for r in records)
    fig, axes = plt.subplots(1, 2 if rewarded else 1, figsize=(12 if rewarded else 7, 4), squeeze=False)
    ax = axes[0][0]
    for key, label in (("loss", "train loss"), ("eval_loss", "held-out loss")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker="." if key == "loss" else "o", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (the policy objective)" if rewarded else "loss (assistant tokens)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss logged yet (fewer steps than train.logging_steps)", ha="center",
                transform=ax.transAxes)
    if rewarded:
        _plot_rewards(axes[0][1], records)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _plot_rewards(ax, records: list[dict]) -> None:
    """The weighted reward's mean (with its std as a band) and each reward function's mean, per logging step."""
    points = [(r["step"], r["reward"], r.get("reward_std") or 0.0) for r in records if r.get("reward") is not None]
    steps, means, stds = zip(*points)
    ax.plot(steps, means, marker=".", label="reward (weighted sum)")
    ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
    names = sorted({k for r in records for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    for key in names:
        own = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if own:
            ax.plot(*zip(*own), linestyle="--", label=key[len("rewards/"):-len("/mean")])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def start_summary(*, model, method: str, dtype, attention: str, batch_size: int, accumulation: int,
                  world_size: int, max_length: int, mean_tokens: float, train_rows: int | str, eval_rows: int,
                  run_dir: Path, unit: str = "rows") -> list[tuple[str, str]]:
    """The derived quantities a user needs to trust a run, as (label, value) rows."""
    trainable, total = count_parameters(model)
    effective = batch_size * accumulation * world_size
    return [
        ("method", method),
        ("trainable / total params", f"{trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"),
        ("precision / attention", f"{str(dtype).removeprefix('torch.')} / {attention}"),
        ("effective batch", f"{batch_size} per device x {accumulation} accumulation x {world_size} device(s)"
                            f" = {effective} {unit}"),
        ("tokens per optimizer step", f"~{effective * mean_tokens:,.0f} (mean {unit[:-1]} {mean_tokens:.0f} tokens, "
                                      f"at most {effective * max_length:,})"),
        ("rows train / held-out", f"{train_rows} / {eval_rows}"),
        ("run dir", str(run_dir)),
    ]
