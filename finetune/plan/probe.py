"""`finetune plan --fit BUDGET --probe N`: train N steps of a candidate in a child process and measure its real peak.

The child trains the recipe with the candidate's changes on its longest rows (the batches that set the peak), saves
nothing and stops after step N. Its peak is what the budget means: on a GPU the memory the card holds for it (the
allocator's reserved peak plus the context CUDA created before any tensor), on a CPU the process's peak resident
memory (the kernel's own account of this process image, VmHWM, so its whole life counts, loading included; not
ru_maxrss, which also holds the parent's size at the moment it spawned the child).
On a CPU the child keeps glibc's heap small (keep_heap_small): otherwise freed activations stay resident and the
peak depends on the allocator's history rather than on what training holds.

    python -m finetune.plan.probe SPEC_JSON     # the child: prints one JSON line
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

#: glibc's mmap threshold for a run held to a CPU budget: tensors of 64 KiB and more are mapped and returned to the
#: system when freed (the default threshold grows to 32 MiB and keeps freed blocks resident).
HEAP_MMAP_THRESHOLD = 65536
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def keep_heap_small() -> bool:
    """Make this process return freed tensors to the system (glibc only); whether it could."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) if name else False
    except (OSError, AttributeError):
        return False


def probe(recipe_path, overrides: list[str], steps: int, timeout: float = 1800) -> dict:
    """Run the candidate in a child; {"peak_bytes", "seconds_per_step", "tokens_per_second", ...} or {"error"}."""
    spec = {"recipe": str(recipe_path), "overrides": list(overrides), "steps": steps}
    try:
        done = subprocess.run([sys.executable, "-m", "finetune.plan.probe", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def process_peak_bytes(context: int = 0) -> int | None:
    """What the budget bounds, for this process so far: the CUDA allocator's reserved peak plus `context` (the CUDA
    context, measured before any tensor) on a GPU; the peak resident memory on a CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_reserved() + context
    return peak_resident_bytes()


def peak_resident_bytes() -> int | None:
    """This process's peak resident memory (Linux's VmHWM), None where /proc does not say."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def _child(spec: dict) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    context = 0
    if cuda:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        context = total - free
    else:
        keep_heap_small()
    from finetune.recipe.load import load_recipe
    from finetune.run.flow import Hooks, run_training

    with tempfile.TemporaryDirectory() as tmp:
        fixed = [f"train.max_steps={spec['steps']}", f"train.output_dir={tmp}/run", "train.save_steps=1000000",
                 "train.eval_steps=null", "train.logging_steps=1", "train.report_to=[]", "train.eval_on_start=false",
                 "train.early_stopping_patience=null"]
        recipe = load_recipe(spec["recipe"], [*spec["overrides"], *fixed])
        clock = StepClock()
        try:
            run_training(recipe, spec["recipe"], log=lambda *a, **k: None,
                         hooks=Hooks(on_trainer=lambda trainer, method: _watch(trainer, clock, recipe)))
        except _Done:
            pass
    timed = clock.seconds[1:] or clock.seconds  # the first step carries warm-up
    seconds = sum(timed) / len(timed)
    tokens = sum(clock.tokens[-len(timed):]) / len(timed)
    peak = process_peak_bytes(context)
    return {"device": "cuda" if cuda else "cpu", "peak_bytes": peak, "seconds_per_step": seconds,
            "tokens_per_step": tokens, "tokens_per_second": tokens / seconds if seconds else 0.0,
            "steps": len(clock.seconds)}


class _Done(Exception):
    """The probe's steps are done: nothing is evaluated or saved."""


class StepClock:
    """Seconds per optimizer step, from one step's end to the next (the first from the start of training), so each
    step counts everything a user waits for: loading the batch, forward, backward, the optimizer, logging and every
    callback; and the tokens each step trained on (without padding), as the trainer counts them. benchmarks/ times
    its runs with it too, so a probe's tokens/s and a benchmark's are the same measure."""

    def __init__(self):
        self.seconds: list[float] = []
        self.tokens: list[int] = []

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock._last, clock._seen = time.perf_counter(), state.num_input_tokens_seen

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                clock.seconds.append(now - clock._last)
                clock.tokens.append(state.num_input_tokens_seen - clock._seen)
                clock._last, clock._seen = now, state.num_input_tokens_seen

        return Clock()


def _watch(trainer, clock: StepClock, recipe) -> None:
    """Train on the longest rows (the peak's batches) and time each step, stopping before the final save."""
    from transformers import TrainerCallback

    data = trainer.train_dataset
    if data is not None and hasattr(data, "column_names") and "input_ids" in data.column_names:
        t = recipe.train
        keep = min(len(data), recipe.train.max_steps * t.batch_size * t.gradient_accumulation_steps)
        import pyarrow.compute as pc

        lengths = pc.list_value_length(data.data.column("input_ids")).to_pylist()
        trainer.train_dataset = data.select(sorted(range(len(data)), key=lambda i: -lengths[i])[:keep])

    class Stop(TrainerCallback):
        def on_train_end(self, *args, **kwargs):
            raise _Done

    trainer.add_callback(clock.callback())
    trainer.add_callback(Stop())


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
