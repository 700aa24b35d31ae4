"""One measured training run in a fresh process, and the plan's prediction for it (used by benchmarks/bench.py,
benchmarks/plan_check.py and tests/plan/test_plan.py).

    python -m benchmarks.measure SPEC_JSON     # prints one JSON line: step times, peak memory, baseline, ...

Memory on a GPU is `torch.cuda.max_memory_allocated` (tensors only). On a CPU it is the process's peak resident
memory while the steps run (sampled from /proc every 5 ms, so model loading is not counted), and "baseline" is
the resident memory just before the model loads (interpreter, libraries, tokenizer, tokenized rows): the part
that the plan's framework-overhead row stands for. glibc keeps freed heap blocks resident, and every allocation
below its mmap threshold comes from that heap; how much RSS overstates live memory therefore depends on the
threshold, not on the training method (see MEMORY_CHECK_ENV). A spec with "tensor_peak" also measures the peak of
live tensors on a CPU (benchmarks.cpu_memory.TensorPeak), the figure two runs of one job are compared on.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from finetune.plan.probe import StepClock

ROOT = Path(__file__).resolve().parent.parent  # the checkout: bench paths are relative to it

#: Timing runs: tensors of 4 MiB and more are mapped and unmapped, smaller ones reuse glibc's heap (a lower
#: threshold makes many more allocations fresh mappings, whose page faults slow the steps).
TIMING_ENV = {"MALLOC_MMAP_THRESHOLD_": "4194304", "TOKENIZERS_PARALLELISM": "false"}
#: Runs checked against the plan: at 64 KiB the heap's retained free blocks stay small and RSS follows live
#: memory; at 4 MiB the heap keeps freed activations resident, the one term the plan does not (cannot) model
#: (compare `benchmarks/plan_check.py` with `--mmap-threshold 4194304`).
MEMORY_CHECK_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}


def run_child(spec: dict, env: dict) -> dict:
    """Runs one spec in a fresh process; {"error": last stderr lines} when it fails."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.measure", json.dumps(spec)], capture_output=True,
                          text=True, env={**os.environ, **env}, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": " | ".join(proc.stderr.strip().splitlines()[-3:])}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def method_options(spec: dict):
    """The validated method section the child trains with (GaLore gets the spec's rank and gap)."""
    from finetune.methods import METHODS

    method = spec["method"] | ({"rank": spec["galore_rank"], "update_proj_gap": spec["gap"]}
                               if spec["method"]["name"] == "galore" else {})
    return METHODS[method["name"]].Options(**method)


def planned_gb(spec: dict, measured: dict) -> float | None:
    """`finetune plan`'s peak for the measured run (None for the peer rows: the plan models finetune's methods).
    The framework-overhead row is the run's own baseline (0 on a GPU, where the peak counts tensors only)."""
    from finetune.models.registry import load_config
    from finetune.plan.estimate import estimate
    from finetune.plan.memory import GIB, Setup

    if "method" not in spec or "weight_bytes" not in measured:
        return None
    setup = Setup(weight_bytes=measured["weight_bytes"], seq_len=spec["seq_len"], batch=spec["batch"],
                  accumulation=1, checkpointing=spec["checkpointing"], attention=measured["attention"],
                  overhead_bytes=measured["baseline_gb"] * GIB, device=measured["device"])
    return estimate(load_config(spec.get("arch") or spec["model"]), method_options(spec), setup)["total"] / GIB


def plan_check(model: str, method: dict, seq_len: int, batch: int, workdir: Path,
               env: dict = MEMORY_CHECK_ENV, steps: int = 3) -> tuple[dict, float]:
    """`steps` steps of one method measured (under MEMORY_CHECK_ENV unless told), and the plan's prediction. Two
    steps hold every moment of the peak (the first optimizer step creates the states, the second backward runs
    beside them); the third is the benchmarks' margin."""
    data = workdir / "rows.jsonl"
    write_rows(data, batch * steps, seq_len)
    spec = {"model": model, "data": str(data), "seq_len": seq_len, "batch": batch, "steps": steps, "galore_rank": 64,
            "gap": 200, "checkpointing": True, "method": method, "out": str(workdir / method["name"])}
    measured = run_child(spec, env)
    if "error" in measured:
        raise RuntimeError(measured["error"])
    return measured, planned_gb(spec, measured)


def write_rows(path: Path, n: int, seq_len: int, seed: int = 0, variable: bool = False) -> None:
    """Rows whose assistant answer alone exceeds seq_len tokens, so every row is cut to exactly seq_len; or, with
    `variable`, answers of seq_len/16 to seq_len/2 words (about a tenth to two thirds of seq_len tokens in
    SmolLM2's template), the spread of a chat set, where padding costs and packing pays."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta zeta theta kappa lambda sigma river stone cloud".split()  # ids < 32000
    with path.open("w") as handle:
        for _ in range(n):
            count = rng.randint(max(1, seq_len // 16), max(2, seq_len // 2)) if variable else seq_len * 2
            answer = " ".join(rng.choice(words) for _ in range(count))
            handle.write(json.dumps({"messages": [{"role": "user", "content": "Write."},
                                                  {"role": "assistant", "content": answer}]}) + "\n")


def child(spec: dict, loader=None) -> dict:
    """Runs inside the subprocess: one variant, measured. `loader` replaces the model loader (finetune's
    load_model arguments); a spec with "arch" trains random weights of that architecture unless one is given."""
    import torch

    from benchmarks.cpu_memory import RSSSampler

    torch.manual_seed(0)
    if "peer" in spec:
        return peer_child(spec)
    import datasets  # noqa: F401 - loaded before the baseline is read
    import peft  # noqa: F401 - the same
    import transformers  # noqa: F401 - the same
    import trl  # noqa: F401 - the same
    from transformers import TrainerCallback

    from finetune.models.load import load_model

    if spec.get("arch") and loader is None:
        loader = random_loader(spec["arch"])
    baseline, loader = baseline_before_model_load(loader or load_model)

    from finetune.recipe.schema import Recipe
    from finetune.run.flow import run_training

    recipe = Recipe.model_validate({
        "model": {"name_or_path": spec["model"], "gradient_checkpointing": spec["checkpointing"]},
        "data": {"train": spec["data"], "max_length": spec["seq_len"]},
        "method": method_options(spec).model_dump(),
        "train": {"max_steps": spec["steps"], "batch_size": spec["batch"], "logging_steps": 1,
                  "packing": spec.get("packing", False),
                  "learning_rate": 1e-5, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                  "save_steps": 10**6, "output_dir": spec["out"]},
    })
    sampler, step_peaks = RSSSampler(), []
    tensor_peak = tensor_peak_for(spec)
    refresh, methods = {}, []

    trained = {}

    class Measure(TrainerCallback):
        def on_train_begin(self, *a, model=None, **k):
            trained.update(weight_bytes=model.get_input_embeddings().weight.element_size(),
                           attention=model.config._attn_implementation,
                           device="cuda" if torch.cuda.is_available() else "cpu")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            if tensor_peak:
                tensor_peak.start()
            sampler.start()

        def on_train_end(self, *a, **k):
            self.final_peak = sampler.stop()  # the steps alone
            if tensor_peak:
                trained["tensor_peak_gb"] = tensor_peak.stop()
            refresh.update(refresh_times(methods[0]))
            raise StepsDone  # a measurement needs no final eval or save (a 7B checkpoint takes minutes to write)

        def on_step_end(self, *a, **k):
            # peak since the previous step end: per-step peaks show whether memory stays flat (LISA switches)
            step_peaks.append(sampler.peak_bytes / 2**30)
            sampler.peak_bytes = 0

    from finetune.run.flow import Hooks

    measure, phases, clock = Measure(), PhaseTimer(), StepClock()

    def watch(trainer, method):  # the production trainer, plus the measuring callbacks
        methods.append(method)
        trainer.add_callback(clock.callback())
        if spec.get("profile"):
            trainer.add_callback(step_profiler(spec))
        else:  # the phase timer's wrappers would show in the profile
            phases.attach(trainer)
        trainer.add_callback(measure)  # last: its on_train_end stops the run

    hooks = Hooks(load_model=loader, on_trainer=watch)
    try:
        run_training(recipe, Path("bench.yaml"), log=lambda *_: None, hooks=hooks)
    except StepsDone:
        pass
    peak = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
            else max(step_peaks + [measure.final_peak]))
    return {"step_seconds": clock.seconds, "step_tokens": clock.tokens, "peak_gb": peak, "step_peaks_gb": step_peaks,
            "baseline_gb": baseline["gb"], "phase_seconds": phases.steps, **trained, **refresh}


def step_profiler(spec: dict):
    """With spec["profile"] (a path): a callback that runs cProfile over the training steps (train begin to end, so
    loading and the final save are left out) and writes its stats there, for benchmarks/profile_overhead.py."""
    if not spec.get("profile"):
        return None
    import cProfile

    from transformers import TrainerCallback

    profiler = cProfile.Profile()

    class Profiled(TrainerCallback):
        def on_train_begin(self, *a, **k):
            profiler.enable()

        def on_train_end(self, *a, **k):
            profiler.disable()
            profiler.dump_stats(spec["profile"])

    return Profiled()


def tensor_peak_for(spec: dict):
    """A live-tensor sampler where the spec asks for one on a CPU (a GPU's peak already counts tensors alone)."""
    import torch

    from benchmarks.cpu_memory import TensorPeak

    return TensorPeak() if spec.get("tensor_peak") and not torch.cuda.is_available() else None


class StepsDone(Exception):
    """Raised at the end of the measured steps: run_training stops there."""


class PhaseTimer:
    """Splits each optimizer step into forward (the loss), backward (the rest of each micro-batch's training
    step: a layer-wise optimizer's steps inside backward count here) and the optimizer step after backward
    (clipping included), so a table can say where a method saves or spends time."""

    def __init__(self):
        self.steps: list[dict] = []

    def attach(self, trainer) -> None:
        from transformers import TrainerCallback

        timer = self

        def timed(function, key):
            def run(*args, **kwargs):
                start = time.perf_counter()
                result = function(*args, **kwargs)
                timer.current[key] += time.perf_counter() - start
                timer.last_end = time.perf_counter()
                return result

            return run

        class Phases(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                timer.current = {"forward": 0.0, "training_step": 0.0}

            def on_optimizer_step(self, *args, **kwargs):
                step = timer.current
                step["backward"] = step.pop("training_step") - step["forward"]
                step["optimizer"] = time.perf_counter() - timer.last_end
                timer.steps.append(step)

        trainer.compute_loss = timed(trainer.compute_loss, "forward")
        trainer.training_step = timed(trainer.training_step, "training_step")
        trainer.add_callback(Phases())


def refresh_times(method) -> dict:
    """Every GaLore subspace refresh (the SVDs) of the run, counted and timed by the method's projectors."""
    projectors = getattr(method, "projectors", [])
    return {"refresh_seconds": sum(p.refresh_seconds for p in projectors),
            "refreshes": sum(p.refreshes for p in projectors)}


def process_baseline() -> float:
    """Resident GiB before any model (interpreter, libraries); 0 on a GPU, whose peak counts tensors only."""
    import torch

    from benchmarks.cpu_memory import RSSSampler

    return 0.0 if torch.cuda.is_available() else RSSSampler().start().stop()


def baseline_before_model_load(load):
    """(baseline, loader): the returned dict gets {"gb": ...} when the loader starts building the model: the
    resident GiB then (interpreter, libraries, tokenizer, tokenized data: host memory that a GPU's peak does not
    count, and that the plan's framework-overhead row stands for)."""
    baseline = {}

    def measured_load(*args, **kwargs):
        baseline["gb"] = process_baseline()
        return load(*args, **kwargs)

    return baseline, measured_load


def random_loader(arch: str):
    """A model loader (finetune's load_model arguments) that builds a randomly initialised model of a known
    architecture: the same compute and memory as the real one, no download. The embedded model's tokenizer encodes
    the rows; the bench's words all map below 32000, the smallest vocabulary among the known architectures."""
    import torch

    from finetune.models.registry import load_config

    config = load_config(arch)

    def random_model(path, dtype, attn_implementation, trust_remote_code=False, vocab_size=None, **kwargs):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
        model = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        if torch.cuda.is_available():
            model = model.cuda()
        model.config.use_cache = False
        return model

    return random_model


def peer_child(spec: dict) -> dict:
    """The same rows through plain transformers.Trainer: what a user of the libraries alone gets."""
    import peft  # noqa: F401 - loaded before the baseline is read
    import torch
    import trl  # noqa: F401 - the same
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from benchmarks.cpu_memory import RSSSampler
    from finetune.data.prepare import build_datasets
    from finetune.models.load import load_tokenizer, resolve_model_path

    path = resolve_model_path(spec["model"])
    tokenizer, _ = load_tokenizer(path)
    data = build_datasets(tokenizer, train=spec["data"], train_split="train", eval=None, eval_split="test",
                          eval_fraction=0.0, format="auto", max_length=spec["seq_len"], max_bad_fraction=0.0,
                          seed=0, log=lambda *_: None)
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    baseline = process_baseline()  # as for our runs: after the tokenizer and data, before the model
    if spec.get("arch"):
        from finetune.models.registry import load_config

        model = AutoModelForCausalLM.from_config(load_config(spec["arch"]), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    extra = {}
    if spec["peer"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    elif spec["peer"] != "full":  # full: the Trainer's default AdamW, as finetune's full method uses
        extra = {"optim": spec["peer"], "optim_target_modules": ["attn", "mlp"],
                 "optim_args": f"rank={spec['galore_rank']}, update_proj_gap={spec['gap']}, scale=0.25"}
    sampler, clock = RSSSampler(), StepClock()
    tensor_peak, measured = tensor_peak_for(spec), {}

    class Measure(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if tensor_peak:
                tensor_peak.start()
            sampler.start()

        def on_train_end(self, *a, **k):
            if tensor_peak:
                measured["tensor_peak_gb"] = tensor_peak.stop()

    # The settings finetune's runs use where they change the step: non-reentrant checkpointing, logging each step.
    args = TrainingArguments(output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
                             learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to="none", activation_checkpointing=spec["checkpointing"],
                             activation_checkpointing_kwargs={"use_reentrant": False},
                             bf16=dtype == torch.bfloat16, dataloader_pin_memory=torch.cuda.is_available(), **extra)

    # transformers' own collator for rows that carry labels: pads them and passes an attention mask, as finetune's
    # collator (TRL's) does, so both runs feed the model the same tensors
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True)
    trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=collate,
                      callbacks=[Measure(), clock.callback(), *filter(None, [step_profiler(spec)])])
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else sampler.stop()
    return {"step_seconds": clock.seconds, "peak_gb": peak, "baseline_gb": baseline, **measured}


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
