"""The benchmark harness itself: `--quick` runs in under a minute and writes a well-formed table."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # spawns processes

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_writes_a_well_formed_table(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--out", str(tmp_path / "quick.md")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert elapsed < 60, f"--quick took {elapsed:.0f} s"
    text = (tmp_path / "quick.md").read_text()
    assert text.startswith("`python scripts/bench.py --quick") and "torch " in text and "transformers " in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == ["full AdamW", "GaLore 8-bit layer-wise",
                                                              "peer: Trainer + peft LoRA r=16"]
    number = r"\d+(\.\d+)?"
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        measured, plan = cells[:7], cells[7:]
        assert len(cells) == 9 and all(re.fullmatch(number, c) for c in measured), row
        # the plan models finetune's own methods; the peer rows have none
        expected = r"—" if row.startswith("| peer:") else number
        assert all(re.fullmatch(expected, c) for c in plan), row
    results = json.loads((tmp_path / "quick.json").read_text())["results"]
    assert results["full AdamW"]["peak_vs_full"] == 1.0
    assert all(r["median_step_s"] > 0 and r["peak_gb"] > 0 for r in results.values())
    for name in ("full AdamW", "GaLore 8-bit layer-wise"):  # where the time goes: parts of the measured step
        phases = results[name]["phase_median_s"]
        assert set(phases) == {"forward", "backward", "optimizer"} and all(v >= 0 for v in phases.values())
        assert phases["forward"] > 0 and phases["backward"] > 0
        assert sum(phases.values()) <= 1.5 * results[name]["median_step_s"]
    assert results["GaLore 8-bit layer-wise"]["plan_gb"] > 0 and results["peer: Trainer + peft LoRA r=16"]["plan_gb"] is None
