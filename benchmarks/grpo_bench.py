"""GRPO on the embedded model, measured: each step's seconds split into generation, rewards and the rest (the old
policy's and the loss's forward and backward), and the peak memory of the steps against `finetune plan`'s prediction.

Each variant runs in a fresh process under finetune/measure.py's MEMORY_CHECK_ENV (glibc's heap kept small, so
resident memory follows live memory): the demo's prompts and rewards (recipes/grpo-demo.yaml), `--steps` steps, the
peak resident memory sampled while they run. Predicted: the plan for the same recipe with its framework-overhead row
replaced by the process's resident memory just before the model loaded. Seconds are the mean of the steps after the
first (which also warms the allocator).

    python -m benchmarks.grpo_bench [--steps 4] [--out benchmarks/results/grpo-smollm2-cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.measure import MEMORY_CHECK_ENV, ROOT

RECIPE = ROOT / "recipes" / "grpo-demo.yaml"
#: (method, num_generations, batch): G completions per prompt, one prompt's group per micro-batch.
VARIANTS = [({"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0}, 4, 4),
            ({"name": "full"}, 4, 4),
            ({"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0}, 8, 8),
            ({"name": "full"}, 8, 8)]


def child(spec: dict) -> dict:
    """One variant, in this process: train and measure."""
    from benchmarks.cpu_memory import RSSSampler
    from benchmarks.measure import baseline_before_model_load
    from finetune.models.load import load_model
    from finetune.models.registry import load_config
    from finetune.plan.estimate import estimate, setup_for
    from finetune.plan.memory import GIB
    from finetune.recipe.load import load_recipe
    from finetune.run.flow import Hooks, run_training
    from finetune.run.report import read_metrics

    overrides = [f"objective.num_generations={spec['generations']}", f"train.batch_size={spec['batch']}",
                 f"train.max_steps={spec['steps']}", "train.logging_steps=1", f"train.save_steps={10**6}",
                 f"train.learning_rate={1e-5 if spec['method']['name'] == 'full' else 1e-4}"]
    overrides += [f"method.{key}={value}" for key, value in spec["method"].items()]
    recipe = load_recipe(RECIPE, overrides)
    baseline, loader = baseline_before_model_load(load_model)
    sampler = RSSSampler()
    hooks = Hooks(load_model=loader, on_trainer=lambda trainer, method: sampler.start())
    run_dir = run_training(recipe, RECIPE, output=Path(spec["out"]), log=lambda *_: None, hooks=hooks)
    peak = sampler.stop()
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r][1:]
    seconds = {part: sum(r[f"time/{part}"] for r in steps) / len(steps) for part in ("generation", "reward",
                                                                                       "backward")}
    # The plan as `finetune plan` makes it, for this CPU: fp32 weights, the CPU's loss and optimizer, and this
    # process's own baseline as the framework overhead.
    setup = replace(setup_for(recipe, None, None, on_gpu=False), device="cpu", overhead_bytes=baseline["gb"] * GIB)
    plan = estimate(load_config(recipe.model.name_or_path), recipe.method, setup)
    return {"seconds": seconds, "peak_gb": peak, "predicted_gb": plan["total"] / GIB,
            "generation_gb": plan["generation"] / GIB}


def run_variant(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.grpo_bench", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, **MEMORY_CHECK_ENV}, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(" | ".join(proc.stderr.strip().splitlines()[-3:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from benchmarks.bench import machine

    command = shlex.join(["python", "-m", "benchmarks.grpo_bench", *sys.argv[1:]])
    lines = [f"`{command}` — {time.strftime('%Y-%m-%d')} — {machine()}", "",
             f"SmolLM2-135M-Instruct, fp32, the demo's prompts and rewards (completions <= 16 tokens), "
             f"{args.steps} steps each, seconds per step the mean of steps 2-{args.steps}; "
             f"{' '.join(f'{k}={v}' for k, v in MEMORY_CHECK_ENV.items())}", "",
             "| method | G | completions / step | generation s | reward s | backward s | step s | predicted GiB "
             "| measured peak GiB | predicted / measured |", "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for method, generations, batch in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            got = run_variant({"method": method, "generations": generations, "batch": batch, "steps": args.steps,
                               "out": str(Path(tmp) / "run")})
        s = got["seconds"]
        line = (f"| {method['name']} | {generations} | {batch} | {s['generation']:.2f} | {s['reward']:.3f} | "
                f"{s['backward']:.2f} | {sum(s.values()):.2f} | {got['predicted_gb']:.3f} | {got['peak_gb']:.3f} | "
                f"{got['predicted_gb'] / got['peak_gb']:.2f} |")
        lines.append(line)
        print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
