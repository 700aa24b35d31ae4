"""Assemble BENCHMARKS.md from the tables benchmarks/bench.py and benchmarks/plan_check.py wrote into
benchmarks/results/ (verbatim: nothing typed by hand)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = [
    ("GaLore vs full AdamW, LoRA and the plain-Trainer peer, CPU", "galore-smollm2-cpu.md"),
    ("GaLore at 512 tokens per step: rank / tokens 0.25, as the GaLore paper's 7B setting, 1024 / (16 x 256), CPU",
     "galore-smollm2-cpu-512tok.md"),
    ("GaLore at 1024 tokens per step (seq 256 x batch 4), CPU", "galore-smollm2-cpu-1024tok.md"),
    ("LISA vs LoRA and full AdamW, CPU", "lisa-smollm2-cpu.md"),
    ("Every method (`make bench`), CPU", "all-smollm2-cpu.md"),
    ("`finetune plan` against measured peaks, CPU", "plan-check-smollm2-cpu.md"),
    ("`finetune plan` against measured peaks at 1024 tokens per step, CPU", "plan-check-smollm2-cpu-1024tok.md"),
    ("The same check with the timing runs' allocator (freed heap blocks stay resident), CPU",
     "plan-check-smollm2-cpu-4mib.md"),
    ("`finetune plan` against measured peaks on a vision-language model (SmolVLM-256M shape), CPU",
     "vlm-plan-cpu.md"),
    ("finetune against plain transformers.Trainer (+ peft) on the same job, and its start-up, CPU",
     "overhead-smollm2-cpu.md"),
    ("The same at batch 4 without checkpointing, logging every step, steps 4-16", "overhead-b4-smollm2-cpu.md"),
    ("Where a step's time goes, finetune against the plain-Trainer peer (cProfile), CPU",
     "profile-overhead-smollm2-cpu.md"),
    ("Padding-free packing on chat-length rows, CPU", "packing-smollm2-cpu.md"),
    ("Data preparation at scale (`benchmarks/data_bench.py`), CPU", "data-prep.md"),
    ("GRPO: seconds per step (generation / reward / backward) and peak memory against the plan, CPU",
     "grpo-smollm2-cpu.md"),
    ("GRPO demo (`make grpo-demo`): the reward curve and held-out answer accuracy, CPU", "grpo-demo-cpu.md"),
    ("`finetune plan --fit`: the choice, every other setting that fits, run, for budgets tight to generous, CPU",
     "fit-smollm2-cpu.md"),
    ("What tuning costs elsewhere: the demo task's gain and a general benchmark's change, base vs tuned, per method "
     "(lm-evaluation-harness), CPU", "forgetting-smollm2-cpu.md"),
    ("GPU acceptance check (`make gpu-check`): Llama-2-7B, every method, 24 GiB cap", "gpu-check-llama2-7b.md"),
    ("`finetune plan --fit` on Llama-2-7B at 24 GiB (`make gpu-check-fit`)", "gpu-check-fit-llama2-7b.md"),
]
GPU = ("## GPU: `python -m benchmarks.bench --arch llama2-7b --seq-len 2048` (bf16, flash attention if available)\n\n"
       "Not measured: no GPU machine was available to the sessions that wrote this file. No figures are estimated "
       "in their place.\n")


def main() -> None:
    parts = ["# Benchmarks\n", "Every table below is the verbatim output of `benchmarks/bench.py`, "
             "`benchmarks/plan_check.py`, `benchmarks/vlm_plan.py`, `benchmarks/gpu_check.py`, "
             "`benchmarks/data_bench.py`, "
             "`benchmarks/grpo_bench.py`, `benchmarks/fit_bench.py`, `scripts/grpo_demo.py` or "
             "`benchmarks/profile_overhead.py` (command, date, "
             "machine and versions in its first line); `python -m benchmarks.benchmarks_md` rebuilds this file from "
             "`benchmarks/results/`. Tables made before the harness moved out of the package name it as it was then "
             "(`python scripts/<name>.py ... --out bench/...`): the same scripts, now `python -m benchmarks.<name>`, "
             "writing into `benchmarks/results/`.\n"]
    for title, name in SECTIONS:
        path = ROOT / "benchmarks" / "results" / name
        if path.exists():
            parts.append(f"## {title}\n\n{path.read_text().strip()}\n")
    parts.append(GPU)
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
