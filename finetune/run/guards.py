"""Trainer callbacks that keep a run's output trustworthy: checkpoints marked complete, a graceful stop on
Ctrl-C / SIGTERM, and a stop when training diverges.

Divergence rule (documented in the README):
- a non-finite loss or gradient norm in any logged step, or a non-finite weight when a checkpoint or the final
  model is about to be saved, stops the run at that step; nothing non-finite is saved;
- so does a logged loss above twice that of a uniform guess over the vocabulary (2 ln V): a language model
  that far below chance has blown up even while its numbers stay finite;
- a gradient norm of exactly 0 for `FLAT_LOGS` logged steps in a row is a collapsed model (typically after a
  learning rate far too high: the loss sits near ln V, a uniform guess, and nothing flows back): reported as a
  warning (on screen and in run.json), the run goes on. A model that learns never has an exactly zero gradient
  at a loss above zero (online RL excepted: a step whose groups all earned equal rewards has none to follow).
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

from transformers import TrainerCallback

from finetune.errors import RunStopped
from finetune.run import rundir

#: Consecutive logged steps of zero gradient at a high loss before a collapse is reported: one such step can be
#: a coincidence (a batch of context-only rows), three in a row are not.
FLAT_LOGS = 3


def _synced_flag(flag: bool, args) -> bool:
    """True on every rank when it is true on any: all ranks must stop at the same step, or a collective hangs."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=args.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class MarkCheckpointsComplete(TrainerCallback):
    """Writes each checkpoint's completion mark once the trainer has written all of it."""

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # sharded checkpoints: every rank has written its part
        if state.is_world_process_zero:
            rundir.mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)


class StopOnSignal(TrainerCallback):
    """First Ctrl-C or SIGTERM: finish the optimizer step under way, save a checkpoint, stop. A second one
    stops at once (KeyboardInterrupt); the newest complete checkpoint is then the one to resume from.

    A signal within `SAME_EVENT_S` of the first counts as the same one: a SIGTERM sent to a whole process group
    reaches a multi-process run's workers directly and once more through the launcher, which passes it on."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    SAME_EVENT_S = 1.0

    def __init__(self, log=print):
        self.log = log
        self.requested: str | None = None
        self._at = 0.0
        self._previous = {}

    def _handle(self, signum, frame):
        import time

        if self.requested:
            if time.monotonic() - self._at > self.SAME_EVENT_S:
                raise KeyboardInterrupt
            return
        self.requested, self._at = signal.Signals(signum).name, time.monotonic()
        self.log(f"\n[yellow]{self.requested}: finishing this step and saving a checkpoint; press Ctrl-C again to "
                 "stop at once[/yellow]")

    def on_train_begin(self, args, state, control, **kwargs):
        # Installed when steps begin: before that, an interrupt has nothing to save and stops at once.
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if _synced_flag(self.requested is not None, args):
            self.requested = self.requested or "a signal on another rank"
            control.should_save = control.should_log = control.should_training_stop = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _non_finite_weight(model) -> str | None:
    """The first parameter holding a NaN or inf, or None. Min and max propagate NaN and show inf without a copy
    of the weights or an overflow; one device sync for all of them."""
    import torch

    named = [(name, p) for name, p in model.named_parameters() if p.numel()]
    if not named:
        return None
    device = named[0][1].device
    extremes = torch.stack([torch.stack(torch.aminmax(p.detach())).float().to(device) for _, p in named])
    finite = torch.isfinite(extremes).all(dim=1)
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


class DivergenceGuard(TrainerCallback):
    """Stops a run whose loss, gradient or weights stop being numbers; reports a collapsed one."""

    def __init__(self, log=print):
        self.log = log
        self.diverged: tuple[int, str] | None = None
        self.warnings: list[str] = []
        self._first_loss: float | None = None
        self._flat = 0

    def _stop(self, control, step: int, reason: str) -> None:
        if self.diverged is None:
            self.diverged = (step, reason)
        control.should_save = False  # never a checkpoint of a diverged model
        control.should_training_stop = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and (control.should_save or state.global_step >= state.max_steps):
            bad = _non_finite_weight(model)
            if _synced_flag(bad is not None, args):
                self._stop(control, state.global_step, f"weight {bad or 'on another rank'} is not finite")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss, norm = logs.get("loss"), logs.get("grad_norm")
        if loss is None:
            return
        values = {"loss": loss, "gradient norm": norm}
        bad = [f"{name} is {value}" for name, value in values.items() if value is not None and not math.isfinite(value)]
        vocabulary = getattr(getattr(kwargs.get("model"), "config", None), "vocab_size", None)
        if not bad and vocabulary and loss > 2 * math.log(vocabulary):
            bad = [f"the loss is {loss:.4g}, more than twice a uniform guess's {math.log(vocabulary):.3g}"]
        if bad:
            self._stop(control, state.global_step, " and ".join(bad))
            return
        if self._first_loss is None:
            self._first_loss = loss
        # Learning from rewards, a zero gradient is a step whose every group earned equal rewards (all right or all
        # wrong: zero advantages), not a collapse.
        rewarded = logs.get("reward") is not None
        self._flat = self._flat + 1 if norm is not None and norm == 0 and not rewarded else 0
        if self._flat == FLAT_LOGS:
            warning = (f"step {state.global_step}: the gradient norm has been exactly 0 for {FLAT_LOGS} logged steps "
                       f"(loss {loss:.3g}, first logged {self._first_loss:.3g}); the model has collapsed and is not "
                       f"learning (learning rate {args.learning_rate:g} too high?)")
            self.warnings.append(warning)
            self.log(f"[yellow]warning: {warning}[/yellow]")


def diverged_error(run_dir: Path, diverged: tuple[int, str], learning_rate: float, method: str,
                   rank: int) -> RunStopped:
    """The one message of a diverged run: where, why, what is kept, the likely cause; run.json records it."""
    step, reason = diverged
    newest = rundir.last_complete_checkpoint(run_dir / "checkpoints", log=lambda *_: None)
    if rank == 0:
        rundir.write_run_info(run_dir, status="diverged", diverged_at_step=step, reason=reason)
    kept = (f"the newest checkpoint, {newest}, holds finite weights" if newest else "no checkpoint was saved")
    return RunStopped(
        f"training diverged at step {step}: {reason}; stopped, and no final weights were saved ({kept}). Likely "
        f"cause: train.learning_rate {learning_rate:g} is too high for method {method} "
        "(typical: 1e-5 to 5e-5 for full fine-tuning, 1e-4 to 3e-4 for LoRA); also check for fp16 overflow (use "
        "bf16) and for rows with extreme content. Start a new run with a lower learning rate (a resumed run "
        "cannot change it).")
