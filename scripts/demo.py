"""`make demo`: the whole user journey on the embedded default, on a CPU, in a few minutes.

Generates the demo data if absent, trains recipes/demo.yaml (LoRA on SmolLM2-135M-Instruct; the model is
fetched and converted on first use) into a fresh run dir, evaluates base vs tuned on the held-out rows, scores both
on a general benchmark (what the tuning cost elsewhere, gated by GENERAL_BOUND), merges the adapter, exports it to
GGUF (q8_0, with an Ollama Modelfile) and prints how the exported file's answers agree with the trained model's, and
fails loudly if the tuned model misses the bar or forgets past the bound. Each step is the CLI command a user
would type, printed before it runs.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

BAR = 0.8  # held-out exact match the tuned model must reach
GENERAL = "data/general/general.jsonl"  # scripts/make_general_bench.py: common knowledge the base model answers
GENERAL_BOUND = 0.05  # the most general accuracy the tuning may cost: 4 of its 83 questions
GGUF_BAR = 0.95  # share of the trained model's exact match the exported q8_0 file must keep
ROOT = Path(__file__).resolve().parent.parent
FINETUNE = str(Path(sys.executable).with_name("finetune"))


def step(*args: str) -> None:
    print(f"\n$ {shlex.join(args)}", flush=True)
    subprocess.run(args, cwd=ROOT, check=True)


def gated_step(*args: str) -> int:
    """A step whose exit 1 is a finding (a regression past the bound), reported at the end; anything else fails."""
    print(f"\n$ {shlex.join(args)}", flush=True)
    code = subprocess.run(args, cwd=ROOT).returncode
    if code not in (0, 1):
        raise subprocess.CalledProcessError(code, args)
    return code


def fresh_run(recipe: str, data: str, generator: str) -> str:
    """Write the demo's data if absent, then train the recipe into a new run dir (never an earlier demo's)."""
    if not (ROOT / data).exists():
        step(sys.executable, generator)
    run = f"runs/{Path(recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    step(FINETUNE, "train", recipe, "--output", run)
    return run


def main() -> int:
    start = time.perf_counter()
    run = fresh_run("recipes/demo.yaml", "data/demo/train.jsonl", "scripts/make_demo_data.py")
    step(FINETUNE, "eval", run, "--compare-base", "--max-new-tokens", "16", "--batch-size", "16")
    if not (ROOT / GENERAL).exists():
        step(sys.executable, "scripts/make_general_bench.py")
    gate = gated_step(FINETUNE, "eval", run, "--tasks", GENERAL, "--max-regression", str(GENERAL_BOUND))
    step(FINETUNE, "merge", run, "--output", f"{run}/merged")
    step(FINETUNE, "export", run, "--quant", "q8_0", "--ollama", "--max-new-tokens", "16", "--max-samples", "200")
    exported = json.loads((ROOT / run / "gguf-q8_0" / "export.json").read_text())
    results = json.loads((ROOT / run / "eval.json").read_text())["results"]
    base, tuned = results["base"]["exact_match"], results["tuned"]["exact_match"]
    (general,) = json.loads((ROOT / run / "eval.json").read_text())["benchmarks"]["changes"]
    minutes = (time.perf_counter() - start) / 60
    print(f"\nheld-out exact match: base {base:.3f} -> tuned {tuned:.3f} "
          f"({results['tuned']['rows']} rows; bar {BAR}); demo took {minutes:.1f} min")
    print(f"general benchmark ({general['n']} questions, accuracy): base {general['base']:.3f} -> tuned "
          f"{general['tuned']:.3f} ({general['delta']:+.3f} ± {general['delta_stderr']:.3f}, paired; bound "
          f"-{GENERAL_BOUND}): the task gain and what it cost elsewhere")
    check = exported["check"]
    print(f"GGUF q8_0 ({exported['gguf']}): greedy answers agree with the trained model on "
          f"{check['agreeing_rows']}/{check['rows']} held-out rows ({check['agreement']:.3f}); exact match trained "
          f"{check['exact_match_trained']:.3f}, GGUF {check['exact_match_gguf']:.3f}")
    if isinstance(check["llama_cpp"], dict):
        print(f"llama.cpp on the same file: agreement {check['llama_cpp']['agreement']:.3f}, exact match "
              f"{check['llama_cpp']['exact_match']:.3f}")
    print(f"chat with it:  {Path(FINETUNE).name} chat {run}/merged")
    print(f"run it in Ollama:  cd {run}/gguf-q8_0 && ollama create demo -f Modelfile && ollama run demo")
    if tuned < BAR or tuned <= base:
        print(f"demo FAILED: tuned exact match {tuned:.3f} is below the bar {BAR} or not above base", file=sys.stderr)
        return 1
    if gate == 1:
        print(f"demo FAILED: the tuning cost more than {GENERAL_BOUND} of the general benchmark's accuracy",
              file=sys.stderr)
        return 1
    if check["exact_match_gguf"] < GGUF_BAR * check["exact_match_trained"]:
        print(f"demo FAILED: the GGUF's exact match {check['exact_match_gguf']:.3f} is below {GGUF_BAR} of the "
              f"trained model's {check['exact_match_trained']:.3f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
