"""What tuning costs elsewhere, per method: the demo task (dates to ISO 8601) trained with every method at the demo
recipe's settings (data, steps, batch, length), each method at the learning rate it needs; then, base vs tuned, the
task's held-out exact match and the general benchmark (`scripts/make_general_bench.py`) through lm-evaluation-harness,
with the change's paired standard error. Every figure comes from the runs' eval.json.

    python -m benchmarks.forgetting_bench [--methods full,lora,galore,lisa] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = str(Path(sys.executable).with_name("finetune"))
GENERAL = "data/general/general.jsonl"
#: Each method's options over recipes/demo.yaml (LoRA is the demo's own). Learning rates: full fine-tuning and LISA
#: (whole layers) at full fine-tuning rates, GaLore at the GaLore paper's 1e-3 range with its 0.25 scale.
METHODS = {
    "full": ["method={name: full}", "train.learning_rate=5e-5"],
    "lora": [],
    "galore": ["method={name: galore, rank: 128, update_proj_gap: 200, scale: 0.25, optim_bits: 8, layerwise: true}",
               "train.learning_rate=1e-3"],
    "lisa": ["method={name: lisa, activated_layers: 2, interval_steps: 20, optim_bits: 8, layerwise: true}",
             "train.learning_rate=1e-4"],
}


def step(*args: str) -> None:
    print(f"\n$ {shlex.join(args)}", flush=True)
    subprocess.run(args, cwd=ROOT, check=True)


def measure(method: str, runs: Path) -> dict:
    run = runs / method
    sets = [arg for override in METHODS[method] for arg in ("--set", override)]
    start = time.perf_counter()
    step(FINETUNE, "train", "recipes/demo.yaml", *sets, "--output", str(run))
    train_s = time.perf_counter() - start
    step(FINETUNE, "eval", str(run), "--compare-base", "--max-new-tokens", "16", "--batch-size", "16")
    step(FINETUNE, "eval", str(run), "--tasks", GENERAL)
    report = json.loads((run / "eval.json").read_text())
    (general,) = [c for c in report["benchmarks"]["changes"] if c["metric"] == "acc,none"]
    return {"method": method, "train_min": train_s / 60, "task": report["results"], "general": general}


def table(rows: list[dict]) -> str:
    lines = ["| method | train min | task exact match base -> tuned | gain | general acc base -> tuned | change | "
             "± stderr (paired) | rows changed (lost / gained) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["general"]
        base, tuned = r["task"]["base"]["exact_match"], r["task"]["tuned"]["exact_match"]
        lines.append(f"| {r['method']} | {r['train_min']:.1f} | {base:.3f} -> {tuned:.3f} | {tuned - base:+.3f} | "
                     f"{g['base']:.3f} -> {g['tuned']:.3f} | {g['delta']:+.3f} | {g['delta_stderr']:.3f} | "
                     f"{r['lost']} / {r['gained']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "forgetting-smollm2-cpu.md")
    args = parser.parse_args()
    if not (ROOT / "data" / "demo" / "train.jsonl").exists():
        step(sys.executable, "scripts/make_demo_data.py")
    if not (ROOT / GENERAL).exists():
        step(sys.executable, "scripts/make_general_bench.py")
    rows = []
    with tempfile.TemporaryDirectory(prefix="forgetting-") as runs:
        for method in args.methods.split(","):
            row = measure(method, Path(runs))
            changed = (Path(runs) / method / "benchmark_rows_changed.jsonl").read_text().splitlines()
            row["lost"] = sum(json.loads(line)["tuned"] < json.loads(line)["base"] for line in changed)
            row["gained"] = len(changed) - row["lost"]
            rows.append(row)
            print(table(rows), flush=True)
    n = rows[0]["general"]["n"]
    text = (f"`python -m benchmarks.forgetting_bench --methods {args.methods}`: recipes/demo.yaml (80 steps x 8 rows, "
            f"max_length 128) per method; task: {rows[0]['task']['tuned']['rows']} held-out dates, greedy exact match; "
            f"general: {GENERAL} ({n} multiple-choice questions, lm-eval acc, 0-shot), base SmolLM2-135M-Instruct vs "
            f"tuned on the same rows.\n\n{table(rows)}\n")
    args.out.write_text(text)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
