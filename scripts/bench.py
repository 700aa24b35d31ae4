"""Benchmark training methods against each other and against the plain-Trainer peer, in one invocation.

Each variant runs in a fresh subprocess (finetune/measure.py, under its TIMING_ENV) for N optimizer steps on
fixed-length rows (every row is cut to exactly --seq-len tokens) and reports the median step time (first
--warmup steps dropped), tokens/s, the peak memory during training (resident memory on a CPU,
torch.cuda.max_memory_allocated on a GPU) and `finetune plan`'s prediction for the same run. "Above baseline"
subtracts the process's resident memory just before the model loaded (interpreter, libraries, tokenizer,
data). On a CPU the measured peak also holds freed heap blocks glibc keeps (see finetune/measure.py), more with
more tokens per step: "plan / peak" below 1 in these tables is mostly that, not the plan;
scripts/plan_check.py measures the same runs with the heap kept small. Ratios are to our full AdamW run from
the same invocation.

    python scripts/bench.py --model smollm2-135m-instruct --seq-len 128 --batch 2 --steps 12
    python scripts/bench.py --quick          # tiny model, seconds: a smoke test of the harness itself
    python scripts/bench.py --arch llama2-7b --seq-len 2048   # random weights from the config (GPU)

Writes a markdown table (stdout and --out .md) and a JSON file beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from finetune.measure import TIMING_ENV, planned_gb, run_child, write_rows

#: name -> (method section or peer spec). Peers use plain transformers.Trainer (+ peft) with the same rows.
VARIANTS = {
    "full AdamW": {"method": {"name": "full"}},
    "full AdamW 8-bit layer-wise": {"method": {"name": "full", "optim_bits": 8, "layerwise": True}},
    # TRL's own 32768-wide LM-head tiles instead of finetune's narrower CPU tiles (finetune.train.Hooks.cpu_lm_head_tile)
    "full AdamW, TRL-width LM-head tiles": {"method": {"name": "full"}, "lm_head_tile": 32768},
    "LoRA r=16 all-linear": {"method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0}},
    "GaLore 8-bit layer-wise": {"method": {"name": "galore", "optim_bits": 8, "layerwise": True}},
    "GaLore 8-bit": {"method": {"name": "galore", "optim_bits": 8, "layerwise": False}},
    # what bitsandbytes' CPU 8-bit update costs: same projection, fused 32-bit AdamW on the low-rank states
    "GaLore 32-bit layer-wise": {"method": {"name": "galore", "optim_bits": 32, "layerwise": True}},
    "GaLore 8-bit layer-wise, exact SVD": {"method": {"name": "galore", "optim_bits": 8, "layerwise": True,
                                                      "svd": "full"}},
    "LoRA r=8 all-linear": {"method": {"name": "lora", "r": 8, "alpha": 32, "dropout": 0.0}},
    "LISA g=2 K=2": {"method": {"name": "lisa", "activated_layers": 2, "interval_steps": 2}},
    "LISA g=2 K=2 8-bit layer-wise": {"method": {"name": "lisa", "activated_layers": 2, "interval_steps": 2,
                                                 "optim_bits": 8, "layerwise": True}},
    # the paper trains embeddings and head; frozen, backward stops at the lowest active layer
    "LISA g=2 K=2, embeddings and head frozen": {"method": {"name": "lisa", "activated_layers": 2, "interval_steps": 2,
                                                            "train_embeddings": False, "train_head": False}},
    "peer: Trainer galore_adamw_layerwise": {"peer": "galore_adamw_layerwise"},
    "peer: Trainer + peft LoRA r=16": {"peer": "lora"},
}
GALORE_SET = ["full AdamW", "LoRA r=16 all-linear", "GaLore 8-bit layer-wise", "GaLore 8-bit",
              "GaLore 32-bit layer-wise", "GaLore 8-bit layer-wise, exact SVD", "peer: Trainer galore_adamw_layerwise"]
QUICK_SET = ["full AdamW", "GaLore 8-bit layer-wise", "peer: Trainer + peft LoRA r=16"]
LISA_SET = ["full AdamW", "LoRA r=8 all-linear", "LISA g=2 K=2", "LISA g=2 K=2 8-bit layer-wise",
            "LISA g=2 K=2, embeddings and head frozen"]


def run_variant(name: str, variant: dict, common: dict, workdir: Path) -> dict:
    spec = {**common, **variant, "out": str(workdir / name.replace(" ", "_").replace(":", ""))}
    result = run_child(spec, TIMING_ENV)
    if "error" not in result:
        result["plan_gb"] = planned_gb(spec, result)
    return result


def summarise(results: dict, warmup: int, seq_len: int, batch: int) -> dict:
    table = {}
    for name, result in results.items():
        if "error" in result:
            table[name] = result
            continue
        steps = result["step_seconds"][warmup:] or result["step_seconds"]
        median = statistics.median(steps)
        table[name] = {"median_step_s": median, "tokens_per_s": seq_len * batch / median, "peak_gb": result["peak_gb"],
                       "step_seconds": result["step_seconds"], "step_peaks_gb": result.get("step_peaks_gb"),
                       "baseline_gb": result.get("baseline_gb", 0.0), "plan_gb": result.get("plan_gb")}
        if result.get("phase_seconds"):
            kept = result["phase_seconds"][warmup:] or result["phase_seconds"]
            table[name]["phase_median_s"] = {k: statistics.median(p[k] for p in kept) for k in kept[0]}
        table[name]["above_baseline_gb"] = result["peak_gb"] - table[name]["baseline_gb"]
        if result.get("refreshes"):
            table[name]["refresh_seconds"] = result["refresh_seconds"]
            table[name]["refreshes"] = result["refreshes"]
    base = table.get("full AdamW", {})
    for row in table.values():
        if "error" not in row and "peak_gb" in base:
            row["peak_vs_full"] = row["peak_gb"] / base["peak_gb"]
            row["above_baseline_vs_full"] = row["above_baseline_gb"] / base["above_baseline_gb"]
            row["time_vs_full"] = row["median_step_s"] / base["median_step_s"]
    return table


def markdown(table: dict) -> str:
    lines = ["| variant | median step (s) | tokens/s | peak memory (GiB) | peak / full | above baseline (GiB) | "
             "above baseline / full | step time / full | plan (GiB) | plan / peak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:120]} | | | | | | | | |")
            continue
        plan = row.get("plan_gb")
        lines.append(f"| {name} | {row['median_step_s']:.3f} | {row['tokens_per_s']:.0f} | {row['peak_gb']:.3f} | "
                     f"{row.get('peak_vs_full', float('nan')):.2f} | {row['above_baseline_gb']:.3f} | "
                     f"{row.get('above_baseline_vs_full', float('nan')):.2f} | "
                     f"{row.get('time_vs_full', float('nan')):.2f} | "
                     + (f"{plan:.3f} | {plan / row['peak_gb']:.2f} |" if plan else "— | — |"))
    return "\n".join(lines)


def extra_notes(table: dict, gap: int, steps: int) -> str:
    """Where each step's time goes (forward, backward, optimizer step after backward), GaLore refresh cost
    amortised over the gap, and per-step peak memory for LISA (flat across switches?)."""
    lines = []
    for name, row in table.items():
        if row.get("refreshes"):
            per_round = row["refresh_seconds"] / math.ceil(steps / gap)  # every projector refreshes at 0, gap, ...
            lines.append(f"- {name}: {row['refreshes']} projector refreshes took {row['refresh_seconds']:.2f} s "
                         f"({per_round:.2f} s per refresh of every projector) = "
                         f"{100 * per_round / gap / row['median_step_s']:.2f}% of step time amortised over gap {gap}")
        if row.get("phase_median_s"):
            lines.append(f"- {name}: median seconds per step in " + ", ".join(
                f"{phase} {seconds:.3f}" for phase, seconds in row["phase_median_s"].items()))
        if name.startswith("LISA") and row.get("step_peaks_gb"):
            peaks = row["step_peaks_gb"]
            lines.append(f"- {name}: peak memory per step (GiB) {', '.join(f'{p:.3f}' for p in peaks)}; "
                         f"after step 1, max/min = {max(peaks[1:]) / min(peaks[1:]):.3f}")
    return ("\n\n" + "\n".join(lines)) if lines else ""


def machine() -> str:
    import torch
    import transformers
    import trl
    import peft

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or 'CPU'}, " \
                                                                             f"{os.cpu_count()} cores"
    return (f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
            f"peft {peft.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--arch", default=None, help="a known architecture (e.g. llama2-7b) with random weights")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="leading steps left out of the median")
    parser.add_argument("--galore-rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=200, help="GaLore update_proj_gap")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--variants", nargs="*", default=None, help="subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--set", dest="variant_set", choices=["galore", "lisa", "all"], default="all",
                        help="a named group of variants (galore, lisa)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 steps: checks the harness")
    parser.add_argument("--out", type=Path, default=None, help="write the table here (.md) and JSON beside it")
    args = parser.parse_args()
    names = args.variants or {"galore": GALORE_SET, "lisa": LISA_SET, "all": list(VARIANTS)}[args.variant_set]
    if args.quick and not args.variants:
        names = QUICK_SET
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.quick:
            args.model, args.seq_len, args.steps, args.warmup, args.galore_rank = (
                str(make_tiny(workdir)), 32, 4, 1, 8)
        data = workdir / "rows.jsonl"
        write_rows(data, args.batch * args.steps, args.seq_len)
        common = {"model": args.model, "arch": args.arch, "data": str(data), "seq_len": args.seq_len, "batch": args.batch,
                  "steps": args.steps, "galore_rank": args.galore_rank, "gap": args.gap,
                  "checkpointing": args.checkpointing}
        results = {}
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_variant(name, VARIANTS[name], common, workdir)
    table = summarise(results, args.warmup, args.seq_len, args.batch)
    command = "python scripts/bench.py " + shlex.join(sys.argv[1:])  # quoted: variant names have spaces
    header = (f"`{command}` — {time.strftime('%Y-%m-%d')} — {machine()}\n"
              f"model {args.arch + ' (random weights)' if args.arch else args.model}, seq {args.seq_len} x batch {args.batch}, {args.steps} steps "
              f"(median over steps after the first {args.warmup}), GaLore rank {args.galore_rank} gap {args.gap}, "
              f"checkpointing {'on' if args.checkpointing else 'off'}\n")
    text = header + "\n" + markdown(table) + extra_notes(table, args.gap, args.steps)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine(),
                                                             "results": table}, indent=2) + "\n")


def make_tiny(workdir: Path) -> Path:
    from finetune.testing import build_tiny_llama, build_tokenizer

    path = workdir / "tiny"
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    build_tiny_llama(len(tokenizer)).save_pretrained(path)
    return path


if __name__ == "__main__":
    main()
