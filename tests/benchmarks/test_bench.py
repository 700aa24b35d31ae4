"""The benchmark harness itself: `--quick` runs in a minute or so and writes a well-formed table."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.timing import ml_stack_start_seconds

pytestmark = pytest.mark.slow  # spawns processes

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_writes_a_well_formed_table(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", "--out", str(tmp_path / "quick.md")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    # two processes on a CPU (--quick skips the live-tensor round, which tests/benchmarks/test_cpu_memory.py runs).
    # Each starts the ML stack and trains 4 steps of the tiny model: at most 4 bare start-ups' time each, a start-up
    # measured now on this machine (so that the bound follows its speed and load)
    start_s = ml_stack_start_seconds()
    assert elapsed < 4 * 2 * start_s, (
        f"--quick took {elapsed:.0f} s, {elapsed / start_s:.1f} start-ups of {start_s:.1f} s")
    text = (tmp_path / "quick.md").read_text()
    assert text.startswith("`python -m benchmarks.bench --quick") and "torch " in text and "transformers " in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == ["full AdamW", "GaLore 8-bit layer-wise"]
    number = r"\d+(\.\d+)?"
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        measured, plan = cells[:8], cells[8:]
        tensors = measured.pop(6)  # the live-tensor peak: not measured by --quick
        assert len(cells) == 10 and tensors == "—" and all(re.fullmatch(number, c) for c in measured), row
        assert all(re.fullmatch(number, c) for c in plan), row  # the plan models finetune's own methods
    results = json.loads((tmp_path / "quick.json").read_text())["results"]
    assert results["full AdamW"]["peak_vs_full"] == 1.0
    assert all(r["median_step_s"] > 0 and r["peak_gb"] > 0 for r in results.values())
    for name in ("full AdamW", "GaLore 8-bit layer-wise"):  # where the time goes: parts of the measured step
        phases = results[name]["phase_median_s"]
        assert set(phases) == {"forward", "backward", "optimizer"} and all(v >= 0 for v in phases.values())
        assert phases["forward"] > 0 and phases["backward"] > 0
        assert sum(phases.values()) <= 1.5 * results[name]["median_step_s"]
    assert results["GaLore 8-bit layer-wise"]["plan_gb"] > 0


def test_peer_verdicts_compare_each_job_with_its_peer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = {"median_step_s": 2.0, "peak_gb": 1.5, "tensor_peak_gb": 1.0, "peak_gb_runs": [1.4, 1.6]}
    table = {"LoRA r=16 all-linear": {**row, "tensor_peak_gb": 1.0 + 4096 / 2**30},
             "peer: Trainer + peft LoRA r=16": {**row, "median_step_s": 1.6},
             "full AdamW": row}  # its peer did not run: no verdict
    lines = bench.peer_verdicts(table).strip().splitlines()
    assert lines == ["- LoRA r=16 all-linear against peer: Trainer + peft LoRA r=16: step time 1.250x; tensor peak "
                     "+4,096 bytes (1.0000x); resident peak 1.000x (rounds: 1.400-1.600 against 1.400-1.600 GiB)"]
