"""-m benchmarks.gpu_check without a GPU: the CPU smoke run end to end (GPU-only parts listed as skipped, the fit
table on the tiny model), the GPU table's verdict from given results, the GPU fit table from stand-in runs, and the
QLoRA random-weight loader on the CPU."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers.timing import ml_stack_start_seconds

from benchmarks import gpu_check, gpu_fit
from finetune.plan.fit import FIT_MARGIN

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


CPU_ONLY = pytest.mark.skipif(__import__("torch").cuda.is_available(),
                              reason="the CPU smoke path runs only without CUDA")
#: The smoke run's fit table runs only the chosen setting: the rows after it take the same path, and each would add a
#: process start-up to the suite (test_gpu_fit_table_* below checks several rows without processes).
FIT_RUNS = 1


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The CPU smoke run, once for the tests that read its output: (seconds it took, the .md text, the JSON)."""
    out = tmp_path_factory.mktemp("smoke") / "check.md"
    start = time.perf_counter()
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--fit-runs", str(FIT_RUNS), "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    return elapsed, out.read_text(), json.loads(out.with_suffix(".json").read_text())


@CPU_ONLY
def test_cpu_smoke_runs_every_method_and_lists_what_needs_cuda(smoke):
    elapsed, text, saved = smoke
    # the parent, one child per method the CPU runs and one per fit-table run, each starting the ML stack and training
    # a few steps of the tiny model: at most 4 bare start-ups' time each, a start-up measured now on this machine (the
    # bound follows its speed and load)
    processes = 1 + len(set(gpu_check.METHODS) - set(gpu_check.NEEDS_CUDA)) + FIT_RUNS
    start_s = ml_stack_start_seconds()
    assert elapsed < 4 * processes * start_s, (
        f"the CPU smoke run took {elapsed:.0f} s, {elapsed / start_s:.1f} start-ups of {start_s:.1f} s")
    assert text.startswith(f"`python -m benchmarks.gpu_check --fit-runs {FIT_RUNS} --out ") and "torch " in text
    assert "transformers " in text
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

    verdict = text.split("## Verdict", 1)[1].split("## Fit table", 1)[0]
    assert "ran: GaLore 8-bit layer-wise, LoRA r=16 all-linear, LISA g=2 K=2, full AdamW 8-bit layer-wise" in verdict
    assert "- skipped: QLoRA 4-bit r=16 all-linear" in verdict
    targets = [line for line in verdict.splitlines() if line.startswith("- Target: ")]
    assert len(targets) == 3 and all("NOT CHECKED (CPU smoke" in t for t in targets)

    assert saved["mode"] == "cpu-smoke" and saved["cap_gib"] is None
    for row in saved["rows"]:
        if row["status"] == "ran":  # the table's error column is the plan against this peak
            assert row["plan_error_pct"] == pytest.approx(100 * (row["plan_gib"] - row["peak_gib"]) / row["peak_gib"])
            assert len(row["step_seconds"]) == 4


@CPU_ONLY
def test_cpu_smoke_fit_table_runs_the_chosen_setting(smoke):
    _, text, saved = smoke
    methods, fit = text.split("## Fit table", 1)
    assert "## Verdict" in methods  # a section after the methods'
    [table] = saved["fit_tables"]  # the smoke's one fit: the recipe with --allow method, on the tiny model
    assert f"### `finetune plan {gpu_fit.FIT_RECIPE} --fit {table['budget_gib']:.4g}GiB --allow method --set " in fit
    assert "model.dtype=auto" in table["command"] and "--set method.rank=8" in table["command"]
    assert 0 < table["fitting"] < table["candidates"]  # the smoke's budget leaves some candidates out
    assert table["usable_gib"] == pytest.approx(table["budget_gib"] * (1 - FIT_MARGIN))

    rows = table_rows(fit, "settings")
    assert len(rows) == len(table["rows"]) == FIT_RUNS
    settings, predicted, measured, error, tokens, predicted_tokens, verdict = rows[0]
    row = table["rows"][0]
    assert row["chosen"] and row["status"] == "ran" and settings == row["settings"]
    assert verdict.startswith("chosen: the fastest predicted that fits")
    assert all(re.fullmatch(NUMBER, c) for c in (predicted, measured, tokens, predicted_tokens)), rows[0]
    assert 0 < float(predicted) <= table["usable_gib"] + 0.005 and float(measured) > 0 and float(tokens) > 0
    plan, peak = row["predicted_gib"], row["measured_gib"]
    assert row["peak_error_pct"] == pytest.approx(100 * (plan - peak) / peak)
    assert error == f"{row['peak_error_pct']:+.1f} %"

    [targets] = [line for line in fit.splitlines() if line.startswith("- Fit targets")]
    assert targets.startswith(f"- Fit targets (1 of 1 runs measured): measured peak <= {table['budget_gib']:.4g} GiB: ")
    assert targets.count("NOT CHECKED (CPU smoke)") == 3
    assert f"({measured} GiB max)" in targets and f"(1.00x of {settings})" in targets


def fake_runs(oom_first: bool = False):
    """A stand-in for run_capped on a GPU: the throughput child's answer, then each run's (an OOM first, if told):
    20 GiB reserved and 0.5 of CUDA context, a step as long as its micro-batches are many."""
    calls = []

    def run_capped(spec, timeout):
        calls.append(spec)
        if "throughput" in spec:
            return {"device": "cuda", "flops": 4e14, "bandwidth": 2e12, "source": "given", "head_flops": 5e14,
                    "layer_overhead": 1e-4}
        if oom_first and len(calls) == 2:
            return {"oom": "CUDA out of memory. Tried to allocate 1.00 GiB", "weight_bytes": 2, "allocated_gb": 23.4}
        accumulation = spec["set"]["train.gradient_accumulation_steps"]
        return {"step_seconds": [5.0] + [0.5 * accumulation] * 2, "step_tokens": [4096] * 3, "peak_gb": 19.0,
                "reserved_gb": 20.0, "context_gb": 0.5, "weight_bytes": 2, "attention": "sdpa", "baseline_gb": 0.0,
                "device": "cuda"}

    return calls, run_capped


def test_gpu_fit_table_runs_each_setting_once_on_a_card_of_the_budget(monkeypatch, tmp_path):
    calls, run_capped = fake_runs()
    monkeypatch.setattr(gpu_fit, "run_capped", run_capped)
    # every candidate that fits runs: the LoRA variant's are all among --allow method's (LoRA at its defaults)
    args = gpu_check.options(["--fits", "galore+method", "lora", "--fit-runs", "1000"], cuda=True)
    galore, lora = gpu_fit.fit_section(args, tmp_path, cuda=True)
    assert calls[0] == {"throughput": "meta-llama/Llama-2-7b-hf", "dtype": "bf16"}  # in a child: off the runs' card
    runs = calls[1:]
    assert len(runs) == galore["fitting"] == len(galore["rows"]) and len(lora["rows"]) == lora["fitting"] > 1
    assert len({json.dumps({k: v for k, v in s.items() if k != "out"}, sort_keys=True) for s in runs}) == len(runs)
    assert {r["settings"] for r in lora["rows"]} and all(r["status"] == "ran" for r in lora["rows"])
    for spec in runs:
        assert (spec["card_gib"], spec["arch"], spec["steps"]) == (24.0, "meta-llama/Llama-2-7b-hf", 3)
        # the recipe's effective batch of 16 kept, the rest of a step in gradient accumulation
        assert spec["batch"] * spec["set"]["train.gradient_accumulation_steps"] == 16
        assert spec["set"]["model.dtype"] == "bf16" and spec["seq_len"] == 256
    assert {s["method"]["name"] for s in runs} >= {"lora"} and any(s["method"].get("quantize") == "4bit" for s in runs)
    assert lora["command"] == f"finetune plan {gpu_fit.FIT_RECIPE} --fit 24GiB --set 'method={{\"name\": \"lora\"}}'"

    for table in (galore, lora):
        rows = table["rows"]
        assert rows[0]["chosen"] and not any(r["chosen"] for r in rows[1:])
        assert all(r["predicted_gib"] <= table["usable_gib"] for r in rows)
        for r in rows:  # the card's peak: the allocator's reservation and the CUDA context
            accumulation = r["changes"].get("train.gradient_accumulation_steps", 1)
            assert r["measured_gib"] == 20.5 and r["tokens_per_s"] == pytest.approx(4096 / (0.5 * accumulation))
    text = gpu_fit.fit_markdown([galore, lora], args, cuda=True)
    assert len(table_rows(text, "settings")) == len(galore["rows"])  # the first table; the second follows it
    assert text.count("- Fit targets (") == 2 and "NOT CHECKED" not in text

    calls, run_capped = fake_runs(oom_first=True)
    monkeypatch.setattr(gpu_fit, "run_capped", run_capped)
    [table] = gpu_fit.fit_section(gpu_check.options(["--fits", "lora", "--fit-runs", "2"], cuda=True), tmp_path, True)
    chosen = table["rows"][0]
    assert chosen["status"] == "OOM" and chosen["measured_gib"] is None
    text = gpu_fit.fit_markdown([table], args, cuda=True)
    assert f"| {chosen['settings']} | {chosen['predicted_gib']:.2f} | OOM: 23.40 GiB allocated at the failure |" in text
    assert "measured peak <= 24 GiB: FAIL (20.50 GiB max; OOM: " in text
    assert "fits: FAIL (the chosen setting exceeded the budget (OOM))" in text


def fit_rows(chosen_tps: float, other_tps: float, errors: tuple[float, float], chosen_status: str = "ran") -> dict:
    """A fit table of two measured runs on a GPU, 20 and 18 GiB, at given speeds and plan errors."""
    runs = (("chosen", 20.0, chosen_tps, errors[0]), ("other", 18.0, other_tps, errors[1]))
    rows = [{"settings": name, "chosen": name == "chosen", "status": "ran", "detail": "", "measured_gib": peak,
             "tokens_per_s": tps, "peak_error_pct": error} for name, peak, tps, error in runs]
    if chosen_status != "ran":
        rows[0] |= {"status": chosen_status, "detail": "boom", "measured_gib": None, "tokens_per_s": None,
                    "peak_error_pct": None}
    return {"budget_gib": 24.0, "rows": rows}


def test_gpu_fit_targets_pass_and_fail_on_the_measurements():
    def outcomes(table, cuda=True):  # the three targets' outcomes, in order
        return re.findall(r"\b(PASS|FAIL|NOT CHECKED)\b", gpu_fit.fit_targets(table, cuda))

    assert outcomes(fit_rows(950, 1000, (5.0, -9.5))) == ["PASS", "PASS", "PASS"]
    assert outcomes(fit_rows(850, 1000, (5.0, -10.5))) == ["PASS", "FAIL", "FAIL"]  # 0.85x; one plan 10.5 % under
    line = gpu_fit.fit_targets(fit_rows(850, 1000, (5.0, -10.5)), cuda=True)
    assert "(0.85x of other)" in line and "(worst -10.5 % (other))" in line and "(20.00 GiB max)" in line
    over = fit_rows(1000, 900, (5.0, 5.0))
    over["budget_gib"] = 19.0  # the chosen run's 20 GiB exceeds it
    assert outcomes(over) == ["FAIL", "FAIL", "PASS"]
    errored = gpu_fit.fit_targets(fit_rows(0, 900, (0, 5.0), chosen_status="error"), cuda=True)
    assert errored.startswith("- Fit targets (1 of 2 runs measured; not measured: error): ")
    assert "fits: NOT CHECKED (the chosen run error)" in errored
    assert outcomes(fit_rows(950, 1000, (5.0, -9.5)), cuda=False) == ["NOT CHECKED"] * 3


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
