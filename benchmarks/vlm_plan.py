"""`finetune plan`'s CPU prediction for a vision-language model next to the measured peak, per method.

The model is SmolVLM-256M-shaped (Idefics3: SmolLM2-135M's language model, a SigLIP-base-sized encoder on 512-pixel
tiles, 64 tokens per tile), built with random weights in the measured process (benchmarks/tiny_vlm.py). Each row
has one 512x512 image and an answer long enough that the row is cut at max_length, so every row is max_length
tokens, image tokens included. Measured as benchmarks/plan_check.py measures text models: two steps in a fresh
process under MEMORY_CHECK_ENV, peak resident memory during the steps; the plan's framework-overhead row is that
process's resident memory just before the model loaded.

    python -m benchmarks.vlm_plan [--seq-len 256] [--batch 2] [--methods lora,full]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import sys
import tempfile
from pathlib import Path

from benchmarks.measure import MEMORY_CHECK_ENV, planned_gb, run_child

METHODS = {"lora": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0}, "full": {"name": "full"},
           "galore": {"name": "galore", "rank": 64, "optim_bits": 8, "layerwise": True},
           "lisa": {"name": "lisa", "activated_layers": 2, "interval_steps": 1}}


def write_image_rows(folder: Path, rows: int, seq_len: int, seed: int = 0) -> Path:
    """`rows` rows of one 512x512 noise image and an answer of 2 x seq_len words (cut at max_length)."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud".split()
    lines = []
    for i in range(rows):
        pixels = np.random.default_rng(seed + i).integers(0, 255, (512, 512, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image{i}.png")
        answer = " ".join(rng.choice(words) for _ in range(2 * seq_len))
        lines.append(json.dumps({"messages": [{"role": "user", "content": "<image>Describe it."},
                                              {"role": "assistant", "content": answer}], "images": [f"image{i}.png"]}))
    path = folder / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def vlm_plan_check(method: dict, workdir: Path, seq_len: int = 256, batch: int = 2, steps: int = 2,
                   layers: tuple[int, int] = (30, 12)):
    """(measured, predicted GiB) for one method on the SmolVLM-shaped model (`layers`: language, vision)."""
    from benchmarks.tiny_vlm import smolvlm_shaped

    model = workdir / f"smolvlm-shaped-{layers[0]}-{layers[1]}"
    if not (model / "config.json").exists():
        smolvlm_shaped(model, *layers)
    data = write_image_rows(workdir, batch * steps, seq_len)
    spec = {"model": str(model), "arch": str(model), "data": str(data), "seq_len": seq_len, "batch": batch,
            "steps": steps, "galore_rank": 64, "gap": 200, "checkpointing": True, "method": method,
            "out": str(workdir / method["name"])}
    measured = run_child(spec, MEMORY_CHECK_ENV)
    if "error" in measured:
        raise RuntimeError(measured["error"])
    return measured, planned_gb(spec, measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--methods", default="lora,full")
    args = parser.parse_args()
    import datetime
    import platform

    import torch
    import transformers

    command = shlex.join(["python", "-m", "benchmarks.vlm_plan", *sys.argv[1:]])
    print(f"`{command}` — {datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, torch "
          f"{torch.__version__}, transformers {transformers.__version__}; SmolVLM-256M-shaped Idefics3 (random "
          f"weights), seq {args.seq_len} x batch {args.batch}, one 512x512 image per row, checkpointing on, fp32, "
          "CPU\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            with contextlib.redirect_stdout(sys.stderr):  # the libraries' own prints stay out of the table
                measured, predicted = vlm_plan_check(METHODS[name], Path(tmp), args.seq_len, args.batch)
            rows.append(f"| {name} | {measured['peak_gb']:.3f} | {predicted:.3f} | "
                        f"{predicted / measured['peak_gb']:.3f} |")
    print("| method | measured peak GiB | plan GiB | plan / measured |\n|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
