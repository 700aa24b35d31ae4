"""Benchmark training methods against each other and against the plain-Trainer peer, in one invocation.

Each variant runs in a fresh subprocess for N optimizer steps on fixed-length rows (every row is cut to
exactly --seq-len tokens) and reports the median step time (first --warmup steps dropped), tokens/s, and
the peak resident memory *during training* (sampled from /proc every 5 ms, so model loading is not counted;
MALLOC_MMAP_THRESHOLD_=4194304 makes freed large tensors return to the OS). "Above baseline" subtracts the
process's resident memory before any model was loaded (interpreter and libraries): the CPU counterpart of
torch.cuda.max_memory_allocated, which is what the GPU rows report. Ratios are to our full AdamW run from
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
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: name -> (method section or peer spec). Peers use plain transformers.Trainer (+ peft) with the same rows.
VARIANTS = {
    "full AdamW": {"method": {"name": "full"}},
    "full AdamW 8-bit layer-wise": {"method": {"name": "full", "optim_bits": 8, "layerwise": True}},
    # TRL's own 32768-wide LM-head tiles instead of finetune's narrower CPU tiles (finetune.train.CPU_LM_HEAD_TILE)
    "full AdamW, TRL-width LM-head tiles": {"method": {"name": "full"}, "lm_head_tile": 32768},
    "LoRA r=16 all-linear": {"method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0}},
    "GaLore 8-bit layer-wise": {"method": {"name": "galore", "optim_bits": 8, "layerwise": True}},
    "GaLore 8-bit": {"method": {"name": "galore", "optim_bits": 8, "layerwise": False}},
    "GaLore 8-bit layer-wise, exact SVD": {"method": {"name": "galore", "optim_bits": 8, "layerwise": True,
                                                      "svd": "full"}},
    "LoRA r=8 all-linear": {"method": {"name": "lora", "r": 8, "alpha": 32, "dropout": 0.0}},
    "LISA g=2 K=2": {"method": {"name": "lisa", "activated_layers": 2, "interval_steps": 2}},
    "LISA g=2 K=2 8-bit layer-wise": {"method": {"name": "lisa", "activated_layers": 2, "interval_steps": 2,
                                                 "optim_bits": 8, "layerwise": True}},
    "peer: Trainer galore_adamw_layerwise": {"peer": "galore_adamw_layerwise"},
    "peer: Trainer + peft LoRA r=16": {"peer": "lora"},
}
GALORE_SET = ["full AdamW", "LoRA r=16 all-linear", "GaLore 8-bit layer-wise", "GaLore 8-bit",
              "GaLore 8-bit layer-wise, exact SVD", "peer: Trainer galore_adamw_layerwise"]
QUICK_SET = ["full AdamW", "GaLore 8-bit layer-wise", "peer: Trainer + peft LoRA r=16"]
LISA_SET = ["full AdamW", "LoRA r=8 all-linear", "LISA g=2 K=2", "LISA g=2 K=2 8-bit layer-wise"]


def write_rows(path: Path, n: int, seq_len: int, seed: int = 0) -> None:
    """Rows whose assistant answer alone exceeds seq_len tokens, so every row is cut to exactly seq_len."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta zeta theta kappa lambda sigma river stone cloud".split()  # ids < 32000
    with path.open("w") as handle:
        for _ in range(n):
            answer = " ".join(rng.choice(words) for _ in range(seq_len * 2))
            handle.write(json.dumps({"messages": [{"role": "user", "content": "Write."},
                                                  {"role": "assistant", "content": answer}]}) + "\n")


def child(spec: dict) -> dict:
    """Runs inside the subprocess: one variant, measured."""
    import torch

    from finetune.report import RSSSampler

    torch.manual_seed(0)
    if "peer" in spec:
        return peer_child(spec)
    import datasets, peft, transformers, trl  # noqa: F401, E401 - loaded before the baseline is read

    baseline = process_baseline()
    if spec.get("arch"):
        use_random_weights(spec["arch"])
    from transformers import TrainerCallback

    from finetune.recipe import Recipe
    from finetune.train import run_training

    recipe = Recipe.model_validate({
        "model": {"name_or_path": spec["model"], "gradient_checkpointing": spec["checkpointing"]},
        "data": {"train": spec["data"], "max_length": spec["seq_len"]},
        "method": spec["method"] | ({"rank": spec["galore_rank"], "update_proj_gap": spec["gap"]}
                                   if spec["method"]["name"] == "galore" else {}),
        "train": {"max_steps": spec["steps"], "batch_size": spec["batch"], "logging_steps": 1,
                  "learning_rate": 1e-5, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                  "save_steps": 10**6, "output_dir": spec["out"]},
    })
    sampler, step_peaks = RSSSampler(), []
    refresh = time_refreshes()

    class Measure(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            sampler.start()

        def on_train_end(self, *a, **k):
            self.final_peak = sampler.stop()  # the steps alone: not the final save that follows

        def on_step_end(self, *a, **k):
            # peak since the previous step end: per-step peaks show whether memory stays flat (LISA switches)
            step_peaks.append(sampler.peak_bytes / 2**30)
            sampler.peak_bytes = 0

    import finetune.train as train_module

    if spec.get("lm_head_tile"):
        train_module.CPU_LM_HEAD_TILE = spec["lm_head_tile"]
    original, measure = train_module._make_trainer, Measure()

    def with_measure(*args, **kwargs):  # the production trainer, plus the measuring callback
        trainer = original(*args, **kwargs)
        trainer.add_callback(measure)
        return trainer

    train_module._make_trainer = with_measure
    run_training(recipe, Path("bench.yaml"), log=lambda *_: None)
    records = [r for r in map(json.loads, (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines())
               if "step_seconds" in r]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else max(step_peaks + [measure.final_peak])
    return {"step_seconds": [r["step_seconds"] for r in records], "peak_gb": peak, "step_peaks_gb": step_peaks,
            "baseline_gb": baseline, **refresh}


def time_refreshes() -> dict:
    """Time every GaLore subspace refresh (the SVDs) of the run; returned dict fills in as training runs."""
    from finetune.optim.galore import Projector

    totals = {"refresh_seconds": 0.0, "refreshes": 0}
    original = Projector.get_orthogonal_matrix

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        result = original(self, *args, **kwargs)
        totals["refresh_seconds"] += time.perf_counter() - start
        totals["refreshes"] += 1
        return result

    Projector.get_orthogonal_matrix = timed
    return totals


def process_baseline() -> float:
    """Resident GiB before any model (interpreter, libraries); 0 on a GPU, whose peak counts tensors only."""
    import torch

    from finetune.report import RSSSampler

    return 0.0 if torch.cuda.is_available() else RSSSampler().start().stop()


def use_random_weights(arch: str) -> None:
    """Train a randomly initialised model of a known architecture (same compute and memory as the real one,
    no download): the production loader is swapped for one that builds the model from the bundled config.
    The embedded model's tokenizer encodes the rows; the bench's words all map below 32000, the smallest
    vocabulary among the known architectures."""
    import finetune.modeling as modeling
    from finetune.plan import load_config

    config = load_config(arch)

    def random_model(path, dtype, attn_implementation, trust_remote_code=False, vocab_size=None, **kwargs):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        if torch.cuda.is_available():
            model = model.cuda()
        model.config.use_cache = False
        return model

    import torch

    modeling.load_model = random_model


def peer_child(spec: dict) -> dict:
    """The same rows through plain transformers.Trainer: what a user of the libraries alone gets."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from finetune.data import build_datasets
    from finetune.modeling import load_tokenizer, resolve_model_path
    from finetune.report import RSSSampler

    import peft, trl  # noqa: F401, E401 - loaded before the baseline is read

    baseline = process_baseline()
    path = resolve_model_path(spec["model"])
    tokenizer, _ = load_tokenizer(path)
    data = build_datasets(tokenizer, train=spec["data"], train_split="train", eval=None, eval_split="test",
                          eval_fraction=0.0, format="auto", max_length=spec["seq_len"], max_bad_fraction=0.0,
                          seed=0, log=lambda *_: None)
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if spec.get("arch"):
        from finetune.plan import load_config

        model = AutoModelForCausalLM.from_config(load_config(spec["arch"]), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    extra = {}
    if spec["peer"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    else:
        extra = {"optim": spec["peer"], "optim_target_modules": ["attn", "mlp"],
                 "optim_args": f"rank={spec['galore_rank']}, update_proj_gap={spec['gap']}, scale=0.25"}
    sampler, times = RSSSampler(), []

    class Measure(TrainerCallback):
        def on_train_begin(self, *a, **k):
            sampler.start()

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    args = TrainingArguments(output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
                             learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to="none", activation_checkpointing=spec["checkpointing"],
                             bf16=dtype == torch.bfloat16, dataloader_pin_memory=torch.cuda.is_available(), **extra)

    def collate(rows):
        return {"input_ids": torch.tensor([r["input_ids"] for r in rows]),
                "labels": torch.tensor([r["labels"] for r in rows])}

    trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=collate,
                      callbacks=[Measure()])
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else sampler.stop()
    return {"step_seconds": times, "peak_gb": peak, "baseline_gb": baseline}


def run_variant(name: str, variant: dict, common: dict, workdir: Path) -> dict:
    spec = {**common, **variant, "out": str(workdir / name.replace(" ", "_").replace(":", ""))}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "4194304", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
                       "baseline_gb": result.get("baseline_gb", 0.0)}
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
             "above baseline / full | step time / full |", "|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:120]} | | | | | | |")
            continue
        lines.append(f"| {name} | {row['median_step_s']:.3f} | {row['tokens_per_s']:.0f} | {row['peak_gb']:.3f} | "
                     f"{row.get('peak_vs_full', float('nan')):.2f} | {row['above_baseline_gb']:.3f} | "
                     f"{row.get('above_baseline_vs_full', float('nan')):.2f} | "
                     f"{row.get('time_vs_full', float('nan')):.2f} |")
    return "\n".join(lines)


def extra_notes(table: dict, gap: int, steps: int) -> str:
    """GaLore refresh cost amortised over the gap, and per-step peak memory for LISA (flat across switches?)."""
    lines = []
    for name, row in table.items():
        if row.get("refreshes"):
            per_round = row["refresh_seconds"] / math.ceil(steps / gap)  # every projector refreshes at 0, gap, ...
            lines.append(f"- {name}: {row['refreshes']} projector refreshes took {row['refresh_seconds']:.2f} s "
                         f"({per_round:.2f} s per refresh of every projector) = "
                         f"{100 * per_round / gap / row['median_step_s']:.2f}% of step time amortised over gap {gap}")
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
    parser.add_argument("--child", help=argparse.SUPPRESS)
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
                        help="a named group of variants (issue 4: galore, issue 5: lisa)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 steps: checks the harness")
    parser.add_argument("--out", type=Path, default=None, help="write the table here (.md) and JSON beside it")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
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
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_llama, build_tokenizer

    path = workdir / "tiny"
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    build_tiny_llama(len(tokenizer)).save_pretrained(path)
    return path


if __name__ == "__main__":
    main()
