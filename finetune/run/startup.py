"""Where the time before the first optimizer step goes, phase by phase, for the start summary, run.json and the bench.

Kept free of module-level library imports: the clock starts before torch and transformers are imported, and
their import is one of the phases it measures.
"""

from __future__ import annotations

import time
from pathlib import Path


class StartupClock:
    """Seconds from the process's start to the end of the first optimizer step: `start` (the interpreter, the
    CLI, the recipe), then the phases the training flow closes with `mark` (`imports`: torch, transformers, TRL,
    peft; `data`: tokenizer and prepared data; `model`: loaded and made trainable; `trainer`: built), then `loop
    start` (the trainer's data loader, optimizer and accelerate's prepare) and `step 1`, which its trainer callback
    closes. At the end of that step the breakdown is logged in one line and recorded in run.json."""

    def __init__(self):
        import psutil

        self.phases: dict[str, float] = {}
        self._last = psutil.Process().create_time()
        self.mark("start")

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = round(now - self._last, 3)
        self._last = now

    def line(self) -> str:
        return f"{sum(self.phases.values()):.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items()) + ")"

    def callback(self, log, run_dir: Path | None):
        """The trainer callback that closes the last two phases and reports: through `log`, and into `run_dir`'s
        run.json (None on other ranks: they write nothing)."""
        from transformers import TrainerCallback

        clock = self

        class FirstStep(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if "loop start" not in clock.phases:
                    clock.mark("loop start")

            def on_step_end(self, args, state, control, **kwargs):
                if "step 1" in clock.phases:
                    return
                clock.mark("step 1")
                log(f"first optimizer step done {clock.line()}")
                if run_dir is not None:
                    from finetune.run.rundir import write_run_info

                    write_run_info(run_dir, startup_seconds=clock.phases)

        return FirstStep()
