"""Where a training step's time goes: finetune's full-AdamW run and the plain `transformers.Trainer` peer on the
same job, each profiled with cProfile over its training steps only (benchmarks.measure's `profile` spec), and the
seconds per step of each part of the step side by side.

    python -m benchmarks.profile_overhead --steps 16 --batch 4 --seq-len 128 \
        --out benchmarks/results/profile-overhead.md

cProfile slows Python-heavy code more than the tensor kernels, so the table says where the time goes, not how fast a
step is: `benchmarks.bench --set overhead` measures that. A part is the cumulative time of the named function
(its callees included), so parts nest (the loss is inside the training step) and do not add up to the step.
"""

from __future__ import annotations

import argparse
import pstats
import shlex
import sys
import tempfile
from pathlib import Path

from benchmarks.bench import machine
from benchmarks.measure import ROOT, TIMING_ENV, run_child, write_rows

#: (label, file suffix, function name): the parts of a Trainer step, from the outer loop in.
PARTS = [
    ("batches: fetch + collate", "transformers/trainer.py", "get_batch_samples"),
    ("training step", "transformers/trainer.py", "training_step"),
    ("loss (forward)", "trl/trainer/sft_trainer.py", "compute_loss"),
    ("loss (forward)", "transformers/trainer.py", "compute_loss"),
    ("model forward", "torch/nn/modules/module.py", "_call_impl"),
    ("backward", "torch/_tensor.py", "backward"),
    ("gradient clipping", "accelerate/accelerator.py", "clip_grad_norm_"),
    ("optimizer step", "accelerate/optimizer.py", "step"),
    ("LR scheduler", "torch/optim/lr_scheduler.py", "step"),
    ("callbacks (all events)", "transformers/trainer_callback.py", "call_event"),
    ("log / save / evaluate", "transformers/trainer.py", "_maybe_log_save_evaluate"),
    ("logging (Trainer.log)", "transformers/trainer.py", "log"),
    ("logging (SFTTrainer.log)", "trl/trainer/sft_trainer.py", "log"),
    ("token count (non-padding)", "transformers/trainer.py", "_get_num_items_in_batch"),
]


def part_seconds(stats_file: Path, steps: int) -> dict[str, float]:
    """Seconds per step of each part (the largest match where a label names several functions)."""
    stats = pstats.Stats(str(stats_file)).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, ...)
    found: dict[str, float] = {}
    for label, suffix, name in PARTS:
        total = sum(row[3] for (file, _, function), row in stats.items()
                    if function == name and file.replace("\\", "/").endswith(suffix))
        found[label] = max(found.get(label, 0.0), total / steps)
    return found


def own_functions(stats_file: Path, steps: int, top: int) -> list[tuple[str, float]]:
    """The functions of finetune's own package with the most cumulative time per step (none for the peer)."""
    stats = pstats.Stats(str(stats_file)).stats
    rows = [(f"{Path(file).relative_to(ROOT)}:{function}", row[3] / steps) for (file, _, function), row in stats.items()
            if str(Path(file).resolve()).startswith(str(ROOT / "finetune"))]
    return sorted(rows, key=lambda r: -r[1])[:top]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="write the table here as well")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "rows.jsonl"
        write_rows(data, args.batch * args.steps, args.seq_len)
        base = {"model": args.model, "data": str(data), "seq_len": args.seq_len, "batch": args.batch,
                "steps": args.steps, "galore_rank": 64, "gap": 200, "checkpointing": False}
        jobs = {"finetune full AdamW": {**base, "method": {"name": "full"}},
                "peer: Trainer full AdamW": {**base, "peer": "full"}}
        parts, own = {}, []
        for name, spec in jobs.items():
            stats = work / f"{len(parts)}.prof"
            result = run_child({**spec, "out": str(work / str(len(parts))), "profile": str(stats)}, TIMING_ENV)
            if "error" in result:
                raise SystemExit(f"{name}: {result['error']}")
            parts[name] = part_seconds(stats, args.steps)
            if not own:
                own = own_functions(stats, args.steps, 8)
    names = list(parts)
    lines = [f"`python -m benchmarks.profile_overhead {shlex.join(argv)}` — {machine()}", "",
             f"Seconds per step under cProfile ({args.steps} steps, batch {args.batch} x {args.seq_len} tokens, no "
             "checkpointing, logging every step); parts nest. finetune's log / save / evaluate is the checkpoint that "
             "transformers writes at the last step (save_strategy steps; the peer saves none), spread over the steps.",
             "",
             "| part | " + " | ".join(names) + " | difference |", "|---|" + "---|" * (len(names) + 1)]
    for label in dict.fromkeys(label for label, _, _ in PARTS):
        ours, theirs = (parts[n].get(label, 0.0) for n in names)
        lines.append(f"| {label} | {ours:.4f} | {theirs:.4f} | {ours - theirs:+.4f} |")
    lines += ["", f"finetune's own functions in {names[0]} (cumulative seconds per step):", ""]
    lines += [f"- `{where}`: {seconds:.4f}" for where, seconds in own]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
