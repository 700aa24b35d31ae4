"""Benchmark training methods against each other and against the plain-Trainer peer, in one invocation.

Each variant runs in a fresh subprocess (finetune/measure.py, under its TIMING_ENV) for N optimizer steps on
fixed-length rows (every row is cut to exactly --seq-len tokens; the "chat-length rows" variants: a tenth to two
thirds of it, padded or packed) and reports the median step time (first --warmup steps dropped; a step is timed
from one step's end to the next, the same way for finetune and the peers), tokens/s (tokens trained, padding not
counted, over the steps' time), the peak memory during training (resident memory on a CPU,
torch.cuda.max_memory_allocated on a GPU) and `finetune plan`'s prediction for the same run. On a CPU each variant
also runs one round more under torch's memory profiler for its peak of live tensors (finetune/cpu_memory.py): the
CPU's counterpart of the GPU figure, exact where resident memory drifts by tens of MB between rounds, and what a
variant is compared with its peer on (the profiler slows steps, so that round is not timed). "Above baseline"
subtracts the process's resident memory just before the model loaded (interpreter, libraries, tokenizer,
data). On a CPU the measured peak also holds freed heap blocks glibc keeps (see finetune/measure.py), more with
more tokens per step: "plan / peak" below 1 in these tables is mostly that, not the plan;
benchmarks/plan_check.py measures the same runs with the heap kept small. Ratios are to our full AdamW run from
the same invocation; `--repeat N` interleaves N rounds of the variants and pools their steps, so that the ratios
hold on a machine whose speed drifts.

    python -m benchmarks.bench --model smollm2-135m-instruct --seq-len 128 --batch 2 --steps 12
    python -m benchmarks.bench --checkpointing --set overhead --repeat 3 --startup recipes/demo.yaml
    python -m benchmarks.bench --quick          # tiny model, seconds: a smoke test of the harness itself
    python -m benchmarks.bench --arch llama2-7b --seq-len 2048   # random weights from the config (GPU)

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import ROOT, TIMING_ENV, planned_gb, run_child, write_rows

#: name -> (method section or peer spec). Peers use plain transformers.Trainer (+ peft) with the same rows.
VARIANTS = {
    "full AdamW": {"method": {"name": "full"}},
    "full AdamW 8-bit layer-wise": {"method": {"name": "full", "optim_bits": 8, "layerwise": True}},
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
    "peer: Trainer full AdamW": {"peer": "full"},
    # rows of a tenth to two thirds of --seq-len tokens (measure.write_rows): padded batches, then packed ones
    "full AdamW, chat-length rows": {"method": {"name": "full"}, "rows": "variable"},
    "full AdamW, chat-length rows, packed": {"method": {"name": "full"}, "rows": "variable", "packing": True},
    "LoRA r=16, chat-length rows": {"method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
                                    "rows": "variable"},
    "LoRA r=16, chat-length rows, packed": {"method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
                                            "rows": "variable", "packing": True},
}
#: finetune against the plain-Trainer peer on the same job: the overhead a user pays for the tool.
OVERHEAD_SET = ["full AdamW", "peer: Trainer full AdamW", "LoRA r=16 all-linear", "peer: Trainer + peft LoRA r=16"]
PACKING_SET = ["full AdamW, chat-length rows", "full AdamW, chat-length rows, packed", "LoRA r=16, chat-length rows",
               "LoRA r=16, chat-length rows, packed"]
GALORE_SET = ["full AdamW", "LoRA r=16 all-linear", "GaLore 8-bit layer-wise", "GaLore 8-bit",
              "GaLore 32-bit layer-wise", "GaLore 8-bit layer-wise, exact SVD", "peer: Trainer galore_adamw_layerwise"]
#: --quick checks the harness on finetune's own flow and the reference; the plain-Trainer peers' path runs in
#: benchmarks/cpu_memory.py's comparison (its tests), so a third start-up here would only add time.
QUICK_SET = ["full AdamW", "GaLore 8-bit layer-wise"]
LISA_SET = ["full AdamW", "LoRA r=8 all-linear", "LISA g=2 K=2", "LISA g=2 K=2 8-bit layer-wise",
            "LISA g=2 K=2, embeddings and head frozen"]


def run_variant(name: str, variant: dict, common: dict, workdir: Path, run: int = 0) -> dict:
    slug = name.replace(' ', '_').replace(':', '').replace(',', '')
    spec = {**common, **variant, "out": str(workdir / f"{slug}-{run}")}
    spec["data"] = common["variable_data" if variant.get("rows") == "variable" else "data"]
    result = run_child(spec, TIMING_ENV)
    if "error" not in result:
        result["plan_gb"] = planned_gb(spec, result)
    return result


def tensor_round(name: str, variant: dict, common: dict, workdir: Path) -> dict:
    """A CPU run's peak of live tensors: the same job once more under the memory profiler (not timed)."""
    result = run_variant(name, {**variant, "tensor_peak": True}, common, workdir, run=-1)
    if "tensor_peak_gb" not in result:
        print(f"{name}: the live-tensor round failed: {result.get('error')}", file=sys.stderr)
        return {}
    return {"tensor_peak_gb": result["tensor_peak_gb"]}


def merge_runs(runs: list[dict], warmup: int) -> dict:
    """One result from repeated runs of a variant: every run's steps after its warm-up, the median run's memory."""
    if any("error" in r for r in runs):
        return next(r for r in runs if "error" in r)
    merged = dict(runs[0])
    for key in ("step_seconds", "step_tokens", "phase_seconds"):
        merged[key] = [x for r in runs for x in (r.get(key) or [])[warmup:]]
    for key in ("peak_gb", "baseline_gb"):
        merged[key] = statistics.median(r.get(key, 0.0) for r in runs)
        merged[f"{key}_runs"] = [r.get(key, 0.0) for r in runs]
    return merged


def summarise(results: dict, warmup: int, seq_len: int, batch: int) -> dict:
    """`warmup` steps are dropped from each result (0 for merged results, which dropped them per run)."""
    table = {}
    for name, result in results.items():
        if "error" in result:
            table[name] = result
            continue
        steps = result["step_seconds"][warmup:] or result["step_seconds"]
        median = statistics.median(steps)
        # tokens trained over the steps' time: counted by the trainer where it counts them (variable-length rows:
        # padding is no work done); the peers' fixed-length rows are seq_len x batch a step
        tokens = result.get("step_tokens", [])[warmup:]
        rate = (sum(tokens) if any(tokens) else seq_len * batch * len(steps)) / sum(steps)
        table[name] = {"median_step_s": median, "tokens_per_s": rate, "peak_gb": result["peak_gb"],
                       "step_seconds": result["step_seconds"], "step_peaks_gb": result.get("step_peaks_gb"),
                       "baseline_gb": result.get("baseline_gb", 0.0), "plan_gb": result.get("plan_gb")}
        if result.get("phase_seconds"):
            kept = result["phase_seconds"][warmup:] or result["phase_seconds"]
            table[name]["phase_median_s"] = {k: statistics.median(p[k] for p in kept) for k in kept[0]}
        table[name]["above_baseline_gb"] = result["peak_gb"] - table[name]["baseline_gb"]
        if "tensor_peak_gb" in result:
            table[name]["tensor_peak_gb"] = result["tensor_peak_gb"]
        for key in ("peak_gb_runs", "baseline_gb_runs"):  # each round's, for the spread between rounds
            if key in result:
                table[name][key] = result[key]
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
             "above baseline / full | tensor peak (GiB) | step time / full | plan (GiB) | plan / peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:120]} | | | | | | | | | |")
            continue
        tensors = f"{row['tensor_peak_gb']:.4f}" if "tensor_peak_gb" in row else "—"  # a GPU's peak is tensors
        plan = row.get("plan_gb")
        ratio = {k: f"{row[k]:.2f}" if k in row else "—" for k in ("peak_vs_full", "above_baseline_vs_full",
                                                                      "time_vs_full")}  # no full AdamW row: none
        lines.append(f"| {name} | {row['median_step_s']:.3f} | {row['tokens_per_s']:.0f} | {row['peak_gb']:.3f} | "
                     f"{ratio['peak_vs_full']} | {row['above_baseline_gb']:.3f} | {ratio['above_baseline_vs_full']} | "
                     f"{tensors} | {ratio['time_vs_full']} | "
                     + (f"{plan:.3f} | {plan / row['peak_gb']:.2f} |" if plan else "— | — |"))
    return "\n".join(lines)


#: Each peer row and the finetune row that runs the same job (transformers' galore_adamw_layerwise is 32-bit).
PEER_OF = {"peer: Trainer full AdamW": "full AdamW", "peer: Trainer + peft LoRA r=16": "LoRA r=16 all-linear",
           "peer: Trainer galore_adamw_layerwise": "GaLore 32-bit layer-wise"}


def peer_verdicts(table: dict) -> str:
    """finetune against the plain-Trainer peer on each job both ran: step time, and memory (on a CPU the live-tensor
    peak, exact; resident memory is also given, with its spread over the rounds)."""
    lines = []
    for peer, ours in PEER_OF.items():
        mine, theirs = table.get(ours, {}), table.get(peer, {})
        if "median_step_s" not in mine or "median_step_s" not in theirs:
            continue
        line = f"- {ours} against {peer}: step time {mine['median_step_s'] / theirs['median_step_s']:.3f}x"
        if "tensor_peak_gb" in mine and "tensor_peak_gb" in theirs:
            extra = round((mine["tensor_peak_gb"] - theirs["tensor_peak_gb"]) * 2**30)
            ratio = mine["tensor_peak_gb"] / theirs["tensor_peak_gb"]
            line += f"; tensor peak {'+' if extra > 0 else ''}{extra:,} bytes ({ratio:.4f}x)"
        line += f"; resident peak {mine['peak_gb'] / theirs['peak_gb']:.3f}x"
        spreads = [r.get("peak_gb_runs") for r in (mine, theirs)]
        if all(s and len(s) > 1 for s in spreads):
            line += (f" (rounds: {min(spreads[0]):.3f}-{max(spreads[0]):.3f} against "
                     f"{min(spreads[1]):.3f}-{max(spreads[1]):.3f} GiB)")
        lines.append(line)
    return ("\n\n" + "\n".join(lines)) if lines else ""


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


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def machine() -> str:
    import peft
    import torch
    import transformers
    import trl

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
    parser.add_argument("--set", dest="variant_set", choices=["galore", "lisa", "overhead", "packing", "all"],
                        default="all", help="a named group of variants (galore, lisa, overhead: finetune against "
                                            "the peers, packing: padded against packed chat-length rows)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the variants this many rounds, interleaved, and pool their steps: ratios between "
                             "variants then hold on a machine whose speed drifts")
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 steps: checks the harness")
    parser.add_argument("--startup", metavar="RECIPE", default=None,
                        help="also break down the start-up of `finetune train RECIPE` (e.g. recipes/demo.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="write the table here (.md) and JSON beside it")
    args = parser.parse_args()
    names = args.variants or {"galore": GALORE_SET, "lisa": LISA_SET, "overhead": OVERHEAD_SET,
                              "packing": PACKING_SET, "all": list(VARIANTS)}[args.variant_set]
    if args.quick and not args.variants:
        names = QUICK_SET
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.quick:
            args.model, args.seq_len, args.steps, args.warmup, args.galore_rank = (
                str(make_tiny(workdir)), 32, 4, 1, 8)
        data, variable = workdir / "rows.jsonl", workdir / "chat-length-rows.jsonl"
        write_rows(data, args.batch * args.steps, args.seq_len)
        write_rows(variable, 4 * args.batch * args.steps, args.seq_len, variable=True)  # packs take several rows
        common = {"model": args.model, "arch": args.arch, "data": str(data), "variable_data": str(variable),
                  "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps, "galore_rank": args.galore_rank,
                  "gap": args.gap, "checkpointing": args.checkpointing}
        runs = {name: [] for name in names}
        for round_ in range(args.repeat):
            for name in names:
                print(f"running {name} ({round_ + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                runs[name].append(run_variant(name, VARIANTS[name], common, workdir, round_))
        if not cuda_available() and not args.quick:  # --quick checks the harness; cpu_memory's tests the tensor peaks
            for name in names:
                print(f"running {name} (live tensors) ...", file=sys.stderr, flush=True)
                runs[name][0].update(tensor_round(name, VARIANTS[name], common, workdir))
        startup = ("\n\n" + startup_table(args.startup, workdir)) if args.startup else ""
    results = {name: merge_runs(r, args.warmup) for name, r in runs.items()}
    table = summarise(results, 0, args.seq_len, args.batch)
    command = "python -m benchmarks.bench " + shlex.join(sys.argv[1:])  # quoted: variant names have spaces
    header = (f"`{command}` — {time.strftime('%Y-%m-%d')} — {machine()}\n"
              f"model {args.arch + ' (random weights)' if args.arch else args.model}, "
              f"seq {args.seq_len} x batch {args.batch}, {args.steps} steps "
              f"(median over steps after the first {args.warmup}"
              + (f", pooled over {args.repeat} interleaved rounds" if args.repeat > 1 else "") + "), "
              f"GaLore rank {args.galore_rank} gap {args.gap}, "
              f"checkpointing {'on' if args.checkpointing else 'off'}\n")
    text = header + "\n" + markdown(table) + peer_verdicts(table) + extra_notes(table, args.gap, args.steps) + startup
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine(),
                                                             "results": table}, indent=2) + "\n")


def startup_table(recipe: str, workdir: Path) -> str:
    """Where the time to the first optimizer step goes for `finetune train RECIPE` (the CLI in a fresh process, the
    model cached): with the data prepared (data.cache off) and read from the cache (after a run that fills it)."""
    finetune = str(Path(sys.executable).with_name("finetune"))
    cases = {"data prepared (data.cache: false)": ["--set", "data.cache=false"], "data read from the cache": []}
    # one step, no held-out rows: what follows the first step is not start-up
    common = ["--set", "train.max_steps=1", "--set", "data.eval=", "--set", "data.eval_fraction=0"]
    rows = {}
    for number, (case, extra) in enumerate(cases.items()):
        if not extra:  # fill the cache first
            subprocess.run([finetune, "train", recipe, *common, "--output", str(workdir / "fill")], cwd=ROOT,
                           check=True, capture_output=True)
        out = workdir / f"startup-{number}"
        proc = subprocess.run([finetune, "train", recipe, *common, *extra, "--output", str(out)], cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"start-up run failed: {proc.stderr[-2000:]}")
        rows[case] = json.loads((out / "run.json").read_text())["startup_seconds"]
    phases = list(next(iter(rows.values())))
    lines = [f"Start-up of `finetune train {recipe}` (one step, no held-out rows), seconds from the process's start:",
             "", "| case | " + " | ".join(phases) + " | first step done |", "|---|" + "---|" * (len(phases) + 1)]
    for case, seconds in rows.items():
        lines.append(f"| {case} | " + " | ".join(f"{seconds[p]:.1f}" for p in phases) +
                     f" | {sum(seconds.values()):.1f} |")
    return "\n".join(lines)


def make_tiny(workdir: Path) -> Path:
    from benchmarks.tiny import build_tiny_llama, build_tokenizer

    path = workdir / "tiny"
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    build_tiny_llama(len(tokenizer)).save_pretrained(path)
    return path


if __name__ == "__main__":
    main()
