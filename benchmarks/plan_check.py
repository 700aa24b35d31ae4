"""Print `finetune plan`'s CPU prediction next to the measured peak for each method, on one model.

Measured: three steps in a fresh process under finetune/measure.py's MEMORY_CHECK_ENV (glibc's heap kept small,
so resident memory follows live memory), peak resident memory during the steps. Predicted: the plan with its
framework-overhead row replaced by that process's resident memory just before the model loaded.

    python -m benchmarks.plan_check [--model smollm2-135m-instruct] [--seq-len 128] [--batch 2]
    python -m benchmarks.plan_check --mmap-threshold 4194304   # the timing runs' allocator: heap blocks retained
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from benchmarks.measure import MEMORY_CHECK_ENV, plan_check

METHODS = [
    {"name": "full"},
    {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
    {"name": "galore", "rank": 64, "optim_bits": 8, "layerwise": True},
    {"name": "lisa", "activated_layers": 2},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--mmap-threshold", default=MEMORY_CHECK_ENV["MALLOC_MMAP_THRESHOLD_"],
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the measured runs (bytes)")
    args = parser.parse_args()
    allocator = {**MEMORY_CHECK_ENV, "MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
    env = " ".join(f"{k}={v}" for k, v in allocator.items())
    command = shlex.join(["python", "-m", "benchmarks.plan_check", *sys.argv[1:]])
    print(f"`{command}` — model {args.model}, seq {args.seq_len} x "
          f"batch {args.batch}, fp32, checkpointing on, 3 steps, {env}\n")
    print("| method | predicted (GiB) | measured peak (GiB) | predicted / measured |\n|---|---|---|---|")
    for method in METHODS:
        with tempfile.TemporaryDirectory() as tmp:
            measured, predicted = plan_check(args.model, method, args.seq_len, args.batch, Path(tmp), allocator)
        print(f"| {method['name']} | {predicted:.3f} | {measured['peak_gb']:.3f} | "
              f"{predicted / measured['peak_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
