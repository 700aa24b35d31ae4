"""Print `finetune plan`'s CPU prediction next to the measured peak for each method, on one model.

Measured: the bench child's peak resident memory during training (scripts/bench.py). Predicted: the plan with
its framework-overhead row replaced by that process's resident memory before the model was loaded.

    python scripts/plan_check.py [--model smollm2-135m-instruct] [--seq-len 128] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

METHODS = [
    {"name": "full"},
    {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
    {"name": "galore", "rank": 64, "optim_bits": 8, "layerwise": True},
    {"name": "lisa", "activated_layers": 2},
]


def main() -> None:
    from bench import write_rows

    from finetune.methods import METHODS as REGISTRY
    from finetune.plan import GIB, Setup, estimate, load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(f"`python scripts/plan_check.py {' '.join(sys.argv[1:])}` — model {args.model}, seq {args.seq_len} x "
          f"batch {args.batch}, fp32, checkpointing on, 3 steps\n")
    print("| method | predicted (GiB) | measured peak (GiB) | predicted / measured |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        write_rows(data, args.batch * 3, args.seq_len)
        for method in METHODS:
            spec = {"model": args.model, "data": str(data), "seq_len": args.seq_len, "batch": args.batch, "steps": 3,
                    "galore_rank": 64, "gap": 200, "checkpointing": True, "method": method,
                    "out": str(Path(tmp) / method["name"])}
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4194304"}
            proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--child", json.dumps(spec)],
                                  capture_output=True, text=True, env=env)
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            setup = Setup(weight_bytes=4, seq_len=args.seq_len, batch=args.batch, accumulation=1,
                          checkpointing=True, attention="sdpa", overhead_bytes=measured["baseline_gb"] * GIB,
                          device="cpu")
            predicted = estimate(load_config(args.model), REGISTRY[method["name"]].Options(**method), setup)
            total = predicted["total"] / GIB
            print(f"| {method['name']} | {total:.3f} | {measured['peak_gb']:.3f} | {total / measured['peak_gb']:.2f} |")


if __name__ == "__main__":
    main()
