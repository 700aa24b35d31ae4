"""-m benchmarks.gpu_check without a GPU: the CPU smoke run end to end (GPU-only parts listed as skipped), the GPU
table's verdict from given results, and the QLoRA random-weight loader on the CPU."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers.timing import ml_stack_start_seconds

from benchmarks import gpu_check

pytestmark = pytest.mark.slow  # spawns processes

ROOT = Path(__file__).resolve().parents[2]

NUMBER = r"[+-]?\d+(\.\d+)?"


def table_rows(text: str, first: str) -> list[list[str]]:
    """The cells of each body row of the markdown table whose header starts with `| first |`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return body


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU smoke path runs only without CUDA")
def test_cpu_smoke_runs_every_method_and_lists_what_needs_cuda(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "check.md")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the parent and one child per method the CPU runs, each starting the ML stack and training a few steps of the tiny
    # model: at most 4 bare start-ups' time each, a start-up measured now on this machine (the bound follows its speed
    # and load)
    processes = 1 + len(set(gpu_check.METHODS) - set(gpu_check.NEEDS_CUDA))
    start_s = ml_stack_start_seconds()
    assert elapsed < 4 * processes * start_s, (
        f"the CPU smoke run took {elapsed:.0f} s, {elapsed / start_s:.1f} start-ups of {start_s:.1f} s")
    text = (tmp_path / "check.md").read_text()
    assert text.startswith("`python -m benchmarks.gpu_check --out ") and "torch " in text and "transformers " in text
    assert "CPU smoke (no CUDA)" in text and "attention sdpa" in text

    rows = table_rows(text, "method")
    assert [r[0] for r in rows] == [label for label, _ in gpu_check.METHODS.values()]  # one row each, none dropped
    by_name = dict(zip(gpu_check.METHODS, rows))
    assert by_name["qlora"][3] == "skipped: needs CUDA (bitsandbytes 4-bit quantization)"
    assert all(c == "—" for c in by_name["qlora"][4:])
    for key in ("galore", "lora", "lisa", "full"):
        method, seq, batch, status, peak, reserved, plan, error, tokens, vs_lora = by_name[key]
        assert (seq, batch, status, reserved) == ("32", "2", "ran", "—"), by_name[key]
        assert all(re.fullmatch(NUMBER, c) for c in (peak, plan, tokens)), by_name[key]
        assert re.fullmatch(NUMBER + " %", error) and re.fullmatch(NUMBER + "x", vs_lora), by_name[key]
        assert float(peak) > 0 and float(plan) > 0 and float(tokens) > 0
    assert by_name["lora"][9] == "1.00x"

    steps = table_rows(text, "GPU-only step")
    assert len(steps) == 3 and all(s[1].startswith("skipped: needs CUDA (") for s in steps)
    assert "24 GiB memory cap" in steps[0][0] and "llama2-7b" in steps[1][0] and "flash" in steps[2][0]

    verdict = text.split("## Verdict", 1)[1]
    assert "ran: GaLore 8-bit layer-wise, LoRA r=16 all-linear, LISA g=2 K=2, full AdamW 8-bit layer-wise" in verdict
    assert "- skipped: QLoRA 4-bit r=16 all-linear" in verdict
    targets = [line for line in verdict.splitlines() if line.startswith("- Target: ")]
    assert len(targets) == 3 and all("NOT CHECKED (CPU smoke" in t for t in targets)

    saved = json.loads((tmp_path / "check.json").read_text())
    assert saved["mode"] == "cpu-smoke" and saved["cap_gib"] is None
    for row in saved["rows"]:
        if row["status"] == "ran":  # the table's error column is the plan against this peak
            assert row["plan_error_pct"] == pytest.approx(100 * (row["plan_gib"] - row["peak_gib"]) / row["peak_gib"])
            assert len(row["step_seconds"]) == 4


def gpu_rows(galore_step_s: float, galore_error: float) -> tuple[list[dict], SimpleNamespace]:
    """GPU-mode rows built from given child results (7B plan, 24 GiB cap): GaLore and LoRA fit, full OOMs."""
    args = gpu_check.options(["--methods", "galore", "lora", "full"], cuda=True)
    args.attention = "flash_attention_2"
    work = Path("/nonexistent")
    rows = []
    for key, step_s in (("galore", galore_step_s), ("lora", 1.0)):
        spec = gpu_check.spec_for(key, args, work, cuda=True)
        result = {"step_seconds": [3.0] + [step_s] * 3, "weight_bytes": 2, "attention": "flash_attention_2",
                  "baseline_gb": 0.0, "device": "cuda", "peak_gb": 0.0, "reserved_gb": 22.5}
        plan = gpu_check.planned_gb(spec, result)
        result["peak_gb"] = plan / (1 + galore_error / 100)  # an error of exactly galore_error %
        rows.append(gpu_check.row_for(key, spec, result, args, cuda=True))
    full = {"oom": "CUDA out of memory. Tried to allocate 500.00 MiB", "weight_bytes": 2, "allocated_gb": 23.6}
    rows.append(gpu_check.row_for("full", gpu_check.spec_for("full", args, work, cuda=True), full, args, cuda=True))
    return gpu_check.with_lora_ratios(rows), args


def test_gpu_table_states_what_fits_and_checks_each_target():
    args = gpu_check.options([], cuda=True)
    assert {k: getattr(args, k) for k in gpu_check.TARGET} == gpu_check.TARGET  # the defaults are the targets'

    rows, args = gpu_rows(galore_step_s=1.0 / 0.95, galore_error=-4.0)
    galore, lora, full = rows
    assert (galore["status"], lora["status"], full["status"]) == ("fits", "fits", "OOM")
    assert galore["plan_error_pct"] == pytest.approx(-4.0) and galore["vs_lora"] == pytest.approx(0.95)
    assert galore["tokens_per_s"] == pytest.approx(256 * 16 * 0.95)  # median step, warm-up step left out
    # full 8-bit layer-wise AdamW on 7B: bf16 weights (12.6 GiB) plus 8-bit states (as much again) exceed 24 GiB
    assert full["plan_gib"] > 24 and full["peak_gib"] is None and "23.60 GiB allocated" in full["detail"]
    table = gpu_check.markdown(rows, cuda=True)
    assert "| full AdamW 8-bit layer-wise | 256 | 16 | OOM: does not fit in 24 GiB (23.60 GiB allocated" in table
    text = gpu_check.verdict(rows, args, cuda=True)
    assert "- Fit in 24 GiB: GaLore 8-bit layer-wise, LoRA r=16 all-linear" in text
    assert "- Do not fit in 24 GiB (OOM): full AdamW 8-bit layer-wise" in text
    targets = [line for line in text.splitlines() if line.startswith("- Target: ")]
    assert [t.split(": ")[2].split(";")[0] for t in targets] == ["PASS", "PASS", "PASS"], targets

    slow, _ = gpu_rows(galore_step_s=1.0 / 0.8, galore_error=-15.0)  # 0.8x LoRA, plan 15 % under
    targets = [line for line in gpu_check.verdict(slow, args, cuda=True).splitlines() if line.startswith("- Target")]
    assert [t.split(": ")[2].split(";")[0] for t in targets] == ["PASS", "FAIL", "FAIL"], targets
    assert targets[1].endswith("measured: -15.0 %") and targets[2].endswith("measured: 0.80x")

    other = gpu_check.options(["--seq-len", "2048", "--batch", "2"], cuda=True)
    assert all("NOT CHECKED (run at seq 2048 x batch 2" in t for t in gpu_check.verdict(rows, other, True).splitlines()
               if t.startswith("- Target"))


def test_child_reports_out_of_memory_as_a_result(monkeypatch):
    import torch

    import benchmarks.measure as measure

    def oom(spec, loader=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(measure, "child", oom)
    result = gpu_check.child({"cap_gib": 24.0})
    assert result["oom"] == "CUDA out of memory. Tried to allocate 2.00 GiB" and result["weight_bytes"] in (2, 4)

    def broken(spec, loader=None):
        raise ValueError("not a memory problem")

    monkeypatch.setattr(measure, "child", broken)
    with pytest.raises(ValueError):  # anything else stays an error (the parent shows its last lines)
        gpu_check.child({"cap_gib": 24.0})


def test_random_weights_loader_quantizes_for_qlora(tiny_model_dir):
    """The QLoRA path of the GPU check's loader, on the CPU (bitsandbytes quantizes 4-bit there too)."""
    import bitsandbytes as bnb
    import torch
    from transformers import BitsAndBytesConfig

    load = gpu_check.gpu_random_loader(str(tiny_model_dir), device="cpu")
    plain = load("unused", torch.bfloat16, "sdpa", False, vocab_size=10)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = load("unused", torch.bfloat16, "sdpa", False, vocab_size=10, quantization_config=config,
                                device_map={"": "cpu"})
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and not any("lm_head" in n for n in quantized)  # every linear but the head
    assert model.is_loaded_in_4bit and model.config.use_cache is False
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
