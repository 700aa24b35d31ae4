"""GPU acceptance check: which methods train Llama-2-7B in a 24 GiB card, how fast, and how close the plan is.

One invocation on one CUDA GPU trains a randomly initialised Llama-2-7B (bf16, the bundled
finetune/configs/llama2-7b.json) for a few steps with each method: GaLore 8-bit layer-wise (rank 1024, the
paper's 7B setting), LoRA, QLoRA 4-bit, LISA gamma=2 and full 8-bit layer-wise AdamW, within --budget-s (under
10 minutes by default; methods left when it is spent are listed as skipped). Each runs in a fresh
process through the production `finetune.run.flow.run_training` (benchmarks.measure's child), with the CUDA caching
allocator capped at --cap-gib (`torch.cuda.set_per_process_memory_fraction`) so that a large GPU stands for a
consumer card: a run that completes fits, an out-of-memory error is reported as "does not fit", never a crash.
flash-attention is used when `flash_attn` is importable (the production `attn_implementation: auto`).

Per method it records the peak `torch.cuda.max_memory_allocated` during the steps, the allocator's peak
reservation (what the cap bounds), `finetune plan`'s prediction for the same run, and tokens/s (median step
after the warm-up steps), and checks the acceptance targets at seq 256 x batch 16: GaLore 8-bit layer-wise fits
in 24 GiB, its plan error is within 10 %, and it trains at >= 0.9x LoRA's tokens/s.

Then the fit table (benchmarks/gpu_fit.py; --fit-table, on by default; --fit-only for it alone): `finetune plan
--fit`'s choice and the next settings that fit, run the same way. --fit-budget-s (200 s) bounds it, so the whole
command takes --budget-s plus that.

Without CUDA the same flow runs as a smoke test on the tiny test Llama (seconds per method), and every GPU-only
part (QLoRA, the memory cap, the 7B architecture, flash-attention) is listed as skipped in the table; its fit table
runs on the tiny model at a budget that about half the candidates fit, its targets not checked.

    python -m benchmarks.gpu_check --out benchmarks/results/gpu-check-llama2-7b.md      # or: make gpu-check
    python -m benchmarks.gpu_check --seq-len 2048 --batch 2 --methods galore lora \\
        --out benchmarks/results/gpu-check-2048.md
    python -m benchmarks.gpu_check --fit-only --out benchmarks/results/gpu-check-fit.md  # the fit table alone

Writes a markdown table (stdout and --out .md) and a JSON file beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench import VARIANTS, machine, make_tiny, summarise
from benchmarks.measure import ROOT, TIMING_ENV, planned_gb, write_rows
from finetune.plan.memory import CUDA_OVERHEAD

GIB = 2**30
LORA = VARIANTS["LoRA r=16 all-linear"]["method"]
#: key -> (table label, method section). Run in this order: the targets' rows (GaLore and LoRA) come first, so a
#: spent time budget skips the others. Labels and sections are bench.py's, so its tables and this one compare.
METHODS = {
    "galore": ("GaLore 8-bit layer-wise", VARIANTS["GaLore 8-bit layer-wise"]["method"]),  # rank: --galore-rank
    "lora": ("LoRA r=16 all-linear", LORA),
    "qlora": ("QLoRA 4-bit r=16 all-linear", LORA | {"quantize": "4bit"}),
    "lisa": ("LISA g=2 K=2", VARIANTS["LISA g=2 K=2"]["method"]),  # K=2: a layer switch within the steps
    "full": ("full AdamW 8-bit layer-wise", VARIANTS["full AdamW 8-bit layer-wise"]["method"]),
}
#: Methods that cannot run without CUDA, and why (shown in the CPU smoke table instead of a measurement).
NEEDS_CUDA = {"qlora": "bitsandbytes 4-bit quantization"}
#: Where the acceptance targets are stated (the issue's consumer-card setting).
TARGET = {"seq_len": 256, "batch": 16, "galore_rank": 1024, "cap_gib": 24.0}
MAX_PLAN_ERROR, MIN_VS_LORA = 10.0, 0.9
#: Defaults per mode: the GPU check's are the targets'; the CPU smoke's take seconds on the tiny model.
DEFAULTS = {"gpu": {"seq_len": 256, "batch": 16, "galore_rank": 1024, "fit_runs": 4,
                    "fits": ["galore", "galore+method", "lora"]},
            "cpu": {"seq_len": 32, "batch": 2, "galore_rank": 8, "fit_runs": 2, "fits": ["galore+method"]}}


# --- the child: one method under the memory cap ------------------------------------------------------------------

def child(spec: dict) -> dict:
    """Runs in the subprocess: cap the allocator, then benchmarks.measure's child; an OOM becomes a result."""
    import torch

    import benchmarks.measure as measure

    context = 0
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()  # creates the CUDA context: what the process holds before any tensor
        context = total - free
        # a fit run stands for a whole card of card_gib (what --fit's budget means): the context takes its share
        cap = spec["card_gib"] * GIB - context if "card_gib" in spec else spec["cap_gib"] * GIB
        # a card smaller than the cap is simply used whole (the fraction must not exceed 1)
        torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, cap / total)))
    loader = gpu_random_loader(spec["arch"]) if torch.cuda.is_available() and spec.get("arch") else None
    if spec.get("set"):
        set_in_recipe(spec["set"])
    try:
        result = measure.child(spec, loader)
    except Exception as err:  # OOM may surface as torch.OutOfMemoryError or a library's RuntimeError
        if not (isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()):
            raise
        cuda = torch.cuda.is_available()
        # the weight bytes the trainer used (resolve_dtype's auto: bf16 where the GPU has it), for the plan's row
        return {"oom": str(err).splitlines()[0][:200], "weight_bytes": 2 if cuda and torch.cuda.is_bf16_supported()
                else 4, "allocated_gb": torch.cuda.max_memory_allocated() / GIB if cuda else 0.0}
    if torch.cuda.is_available():  # reset with the allocated peak when training began (measure's callback)
        result.update(reserved_gb=torch.cuda.max_memory_reserved() / GIB, context_gb=context / GIB)
    return result


def set_in_recipe(changes: dict) -> None:
    """Settings that benchmarks.measure's spec has no key for (gradient accumulation, the weights' dtype), applied to
    the recipe its child builds on the way into run_training, validated as a recipe file's would be."""
    import finetune.run.flow as flow
    from finetune.plan.fit import candidate_recipe

    train = flow.run_training

    def run_training(recipe, *args, **kwargs):
        return train(candidate_recipe(recipe, changes), *args, **kwargs)

    flow.run_training = run_training  # measure.child imports it when it runs, after this


def gpu_random_loader(arch: str, device: str = "cuda"):
    """benchmarks.measure's random-weight loader, with two changes for the GPU check: the weights are initialised
    on the GPU (drawing 6.7B random normals is the slow part of a CPU load, and every method loads), and a
    quantization config (QLoRA) is honoured, which measure's loader ignores: the random weights go through
    transformers' own bitsandbytes loading, as a checkpoint on disk would (tests/benchmarks/test_gpu_check.py runs
    this on the CPU)."""
    import torch

    from benchmarks.measure import random_loader

    random_model = random_loader(arch)

    def load(path, dtype, attn_implementation, trust_remote_code=False, vocab_size=None, quantization_config=None,
             **load_kwargs):
        with torch.device(device):
            model = random_model(path, dtype, attn_implementation)
        if quantization_config is None:
            return model
        # from host memory, as a checkpoint's tensors arrive: the GPU then holds only the quantized weights
        state, config, cls = {k: v.cpu() for k, v in model.state_dict().items()}, model.config, type(model)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                    attn_implementation=attn_implementation, quantization_config=quantization_config,
                                    **load_kwargs)
        model.config.use_cache = False
        return model

    return load


def run_capped(spec: dict, timeout: float) -> dict:
    """One method in a fresh process (this file's --child), killed with its process group after `timeout` s."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--child", json.dumps(spec)], cwd=ROOT,
                            env={**os.environ, **TIMING_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": " / ".join(err.strip().splitlines()[-3:])}
    return json.loads(out.strip().splitlines()[-1])


# --- the table -----------------------------------------------------------------------------------------------------

def row_for(key: str, spec: dict, result: dict, args, cuda: bool) -> dict:
    """One table row: status, memory, plan and speed of a method (ratios to LoRA are added afterwards)."""
    label = METHODS[key][0]
    row = {"key": key, "method": label, "seq_len": args.seq_len, "batch": args.batch, "peak_gib": None,
           "reserved_gib": None, "plan_gib": None, "plan_error_pct": None, "tokens_per_s": None, "vs_lora": None}
    if "skipped" in result:
        return row | {"status": "skipped", "detail": result["skipped"]}
    if "error" in result:
        return row | {"status": "error", "detail": result["error"]}
    if "oom" in result:
        # the plan for the same run, from the weight bytes the child reported (no step completed to measure)
        assumed = {"weight_bytes": result["weight_bytes"], "attention": args.attention, "baseline_gb": 0.0,
                   "device": "cuda"}
        return row | {"status": "OOM", "detail": f"does not fit in {args.cap_gib:g} GiB "
                                                 f"({result['allocated_gb']:.2f} GiB allocated at the failure)",
                      "plan_gib": planned_gb(spec, assumed)}
    measured = summarise({label: result | {"plan_gb": planned_gb(spec, result)}}, args.warmup, args.seq_len,
                         args.batch)[label]
    peak, plan = measured["peak_gb"], measured["plan_gb"]
    return row | {"status": "fits" if cuda else "ran", "detail": "", "peak_gib": peak,
                  "reserved_gib": result.get("reserved_gb"), "plan_gib": plan,
                  "plan_error_pct": 100 * (plan - peak) / peak, "tokens_per_s": measured["tokens_per_s"],
                  "attention": result["attention"], "step_seconds": result["step_seconds"]}


def cell(value, fmt: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{suffix}"


def markdown(rows: list[dict], cuda: bool) -> str:
    peak = "peak allocated GiB" if cuda else "peak resident GiB"
    lines = [f"| method | seq | batch | status | {peak} | reserved GiB | plan GiB | plan error | tokens/s | "
             "tokens/s vs LoRA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (f": {r['detail'][:160]}" if r["detail"] else "")
        status = status.replace("|", "\\|")  # an error's text must not split the row
        lines.append(f"| {r['method']} | {r['seq_len']} | {r['batch']} | {status} | {cell(r['peak_gib'], '.2f')} | "
                     f"{cell(r['reserved_gib'], '.2f')} | {cell(r['plan_gib'], '.2f')} | "
                     f"{cell(r['plan_error_pct'], '+.1f', ' %')} | {cell(r['tokens_per_s'], '.0f')} | "
                     f"{cell(r['vs_lora'], '.2f', 'x')} |")
    return "\n".join(lines)


def skipped_steps(args) -> str:
    """The GPU-only parts of the check that a CPU smoke run cannot do, listed rather than silently dropped."""
    steps = [(f"{args.cap_gib:g} GiB memory cap (torch.cuda.set_per_process_memory_fraction)", "no allocator to cap"),
             ("llama2-7b architecture, random weights, bf16", "the tiny 2-layer test Llama in fp32 instead"),
             ("flash-attention (flash_attention_2)", f"{args.attention} instead")]
    return "\n".join(["| GPU-only step | status |", "|---|---|"]
                     + [f"| {step} | skipped: needs CUDA ({why}) |" for step, why in steps])


def describe(setting: dict) -> str:
    return (f"seq {setting['seq_len']} x batch {setting['batch']}, GaLore rank {setting['galore_rank']}, "
            f"cap {setting['cap_gib']:g} GiB")


def verdict(rows: list[dict], args, cuda: bool) -> str:
    """Which methods fit in the cap, and whether each acceptance target holds."""
    by_status = {s: [r["method"] for r in rows if r["status"] == s] for s in ("fits", "OOM", "error", "skipped")}
    lines = ["## Verdict", ""]
    if cuda:
        lines.append(f"- Fit in {args.cap_gib:g} GiB: {', '.join(by_status['fits']) or 'none'}")
        lines.append(f"- Do not fit in {args.cap_gib:g} GiB (OOM): {', '.join(by_status['OOM']) or 'none'}")
    else:
        lines.append("- Fit in the cap: not checked (CPU smoke: no CUDA, so no memory cap); ran: "
                     + (", ".join(r["method"] for r in rows if r["status"] == "ran") or "none"))
    for status in ("error", "skipped"):
        if by_status[status]:
            lines.append(f"- {status}: {', '.join(by_status[status])}")
    galore, lora = (next((r for r in rows if r["key"] == key), None) for key in ("galore", "lora"))
    setting = {"seq_len": args.seq_len, "batch": args.batch, "galore_rank": args.galore_rank, "cap_gib": args.cap_gib}

    def outcome(holds: bool, missing: str | None) -> str:
        if not cuda:
            return "NOT CHECKED (CPU smoke: the targets are for llama2-7b on CUDA)"
        if setting != TARGET:
            return f"NOT CHECKED (run at {describe(setting)}; the targets are stated at {describe(TARGET)})"
        return f"NOT CHECKED ({missing})" if missing else "PASS" if holds else "FAIL"

    status = galore["status"] if galore else "not run"
    error = galore and galore["plan_error_pct"]
    vs_lora = galore and galore["vs_lora"]
    done = None if galore and galore["peak_gib"] is not None else f"GaLore {status}"
    targets = [
        (f"GaLore 8-bit layer-wise fits at {describe(TARGET)}", status == "fits",
         None if galore and status != "skipped" else f"GaLore {status}", status),
        (f"its plan error is within {MAX_PLAN_ERROR:g} %", error is not None and abs(error) <= MAX_PLAN_ERROR, done,
         cell(error, "+.1f", " %")),
        (f"it trains at >= {MIN_VS_LORA:g}x LoRA's tokens/s", vs_lora is not None and vs_lora >= MIN_VS_LORA,
         done or (None if lora and lora["tokens_per_s"] else f"LoRA {lora['status'] if lora else 'not run'}"),
         cell(vs_lora, ".2f", "x")),
    ]
    for name, holds, missing, value in targets:
        lines.append(f"- Target: {name}: {outcome(holds, missing)}; measured: {value}")
    return "\n".join(lines)


def header(args, cuda: bool, command: str) -> str:
    import torch

    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        mode = (f"GPU check: llama2-7b random weights, {dtype}, allocator capped at {args.cap_gib:g} GiB "
                f"({min(1.0, args.cap_gib / total):.3f} of the card's {total:.1f} GiB; a real card also holds the CUDA "
                f"context outside the allocator, the plan's {CUDA_OVERHEAD / GIB:g} GiB CUDA overhead row)")
    else:
        mode = "CPU smoke (no CUDA): the tiny 2-layer test Llama, fp32, no memory cap; peak is resident memory"
    flash = "flash_attn " + ("installed" if importlib.util.find_spec("flash_attn") else "not installed")
    return (f"`{command}` — {time.strftime('%Y-%m-%d')} — {machine()}\n\n"
            f"{mode}. Seq {args.seq_len} x batch {args.batch}, {args.steps} steps (median after the first "
            f"{args.warmup}), GaLore rank {args.galore_rank} gap {args.gap}, gradient checkpointing "
            f"{'on' if args.checkpointing else 'off'}, attention {args.attention} ({flash}).\n")


# --- the run -------------------------------------------------------------------------------------------------------

def spec_for(key: str, args, workdir: Path, cuda: bool) -> dict:
    """benchmarks.measure's spec for one method (plus the cap this file's child applies)."""
    return {"model": args.model, "arch": "llama2-7b" if cuda else None, "data": str(workdir / "rows.jsonl"),
            "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps, "galore_rank": args.galore_rank,
            "gap": args.gap, "checkpointing": args.checkpointing, "cap_gib": args.cap_gib, "method": METHODS[key][1],
            "out": str(workdir / key)}


def run(args, workdir: Path, cuda: bool) -> list[dict]:
    data = workdir / "rows.jsonl"
    write_rows(data, args.batch * args.steps, args.seq_len)
    deadline, rows = time.monotonic() + args.budget_s, []
    for key in args.methods:
        spec = spec_for(key, args, workdir, cuda)
        left = deadline - time.monotonic()
        if not cuda and key in NEEDS_CUDA:
            result = {"skipped": f"needs CUDA ({NEEDS_CUDA[key]})"}
        elif left < 30:  # too little to load a model and take a step
            result = {"skipped": f"the time budget of {args.budget_s:.0f} s was spent"}
        else:
            print(f"running {METHODS[key][0]} ...", file=sys.stderr, flush=True)
            result = run_capped(spec, min(args.child_timeout, left))
            shutil.rmtree(spec["out"], ignore_errors=True)  # a 7B run ends with a full bf16 save: not kept
        rows.append(row_for(key, spec, result, args, cuda))
    return with_lora_ratios(rows)


def with_lora_ratios(rows: list[dict]) -> list[dict]:
    """Each measured row's tokens/s as a multiple of LoRA's (the speed the GaLore target is stated against)."""
    lora = next((r for r in rows if r["key"] == "lora" and r["tokens_per_s"]), None)
    for r in rows:
        if lora and r["tokens_per_s"]:
            r["vs_lora"] = r["tokens_per_s"] / lora["tokens_per_s"]
    return rows


def options(argv: list[str], cuda: bool) -> argparse.Namespace:
    """The command line, with the defaults of the mode (the targets' setting on a GPU, seconds on a CPU)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: the spec of one capped run
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seq-len", type=int, default=None, help="default 256 (GPU) / 32 (CPU smoke)")
    parser.add_argument("--batch", type=int, default=None, help="default 16 (GPU) / 2 (CPU smoke)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="leading steps left out of the median")
    parser.add_argument("--galore-rank", type=int, default=None, help="default 1024 (GPU) / 8 (CPU smoke)")
    parser.add_argument("--gap", type=int, default=200, help="GaLore update_proj_gap")
    parser.add_argument("--cap-gib", type=float, default=TARGET["cap_gib"], help="usable GPU memory per process")
    # 7B at 4096 tokens a step holds ~11 GiB of activations without checkpointing: no method would fit 24 GiB
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer encodes the rows (GPU)")
    parser.add_argument("--child-timeout", type=float, default=200, help="seconds one method may take")
    parser.add_argument("--budget-s", type=float, default=570, help="seconds for all methods (then: skipped)")
    parser.add_argument("--out", type=Path, default=None, help="write the table here (.md) and JSON beside it")
    from benchmarks.gpu_fit import add_options

    add_options(parser)
    args = parser.parse_args(argv)
    for name, value in DEFAULTS["gpu" if cuda else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def methods_report(rows: list[dict], args, cuda: bool, command: str) -> str:
    """The header, and unless --fit-only the methods table, the GPU-only steps a CPU skips, and the verdict."""
    attentions = {r["attention"] for r in rows if r.get("attention")}
    if attentions and attentions != {args.attention}:  # what the runs used, if it differs from the resolution
        args.attention = ", ".join(sorted(attentions))
    text = header(args, cuda, command)
    if args.fit_only:
        return text
    text += "\n" + markdown(rows, cuda)
    if not cuda:
        text += "\n\n" + skipped_steps(args)
    return text + "\n\n" + verdict(rows, args, cuda)


def save(text: str, args, cuda: bool, command: str, rows: list[dict], fit_tables: list[dict]) -> None:
    if not args.out:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": machine(), "mode": "gpu" if cuda else "cpu-smoke",
         "cap_gib": args.cap_gib if cuda else None, "attention": args.attention, "rows": rows,
         "fit_tables": fit_tables}, indent=2) + "\n")


def main() -> None:
    import torch

    from benchmarks.gpu_fit import fit_markdown, fit_section, throughput_child
    from finetune.models.load import resolve_attention

    cuda = torch.cuda.is_available()
    args = options(sys.argv[1:], cuda)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(throughput_child(spec) if "throughput" in spec else child(spec)))
        return
    # what the runs' `attn_implementation: auto` resolves to; nothing here touches the GPU before the runs end (a
    # CUDA context in this process would take memory from the children's card)
    args.attention = resolve_attention("auto")
    command = "python -m benchmarks.gpu_check " + shlex.join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not cuda:
            args.model = str(make_tiny(workdir))
        rows = [] if args.fit_only else run(args, workdir, cuda)
        text = methods_report(rows, args, cuda, command)
        print(text, flush=True)
        save(text, args, cuda, command, rows, [])  # kept should the fit table not finish
        fit_tables = fit_section(args, workdir, cuda) if args.fit_table or args.fit_only else []
    if fit_tables:
        fit_text = fit_markdown(fit_tables, args, cuda)
        print("\n" + fit_text)
        text += "\n\n" + fit_text
    save(text, args, cuda, command, rows, fit_tables)


if __name__ == "__main__":
    main()
