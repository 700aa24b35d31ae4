"""`make grpo-demo`: learning from rewards (GRPO, full fine-tuning) on the embedded default, on a CPU.

Writes the prompts if absent (scripts/make_grpo_demo_data.py), trains recipes/grpo-demo.yaml into a fresh run dir,
scores base and tuned on the held-out sums with `finetune eval --compare-base` (strict and lenient answer accuracy
side by side), and fails loudly if strict accuracy gains less than the bar. Each step is the CLI command a user
would type.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from demo import (  # the SFT demo's way of running each command
    FINETUNE,
    ROOT,
    fresh_run,
    step,
)

BAR = 0.25  # held-out strict accuracy the tuned model must gain over the base (absolute)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the reward curve and the accuracy table here (markdown)")
    args = parser.parse_args()
    start = time.perf_counter()
    run = fresh_run("recipes/grpo-demo.yaml", "data/grpo-demo/train.jsonl", "scripts/make_grpo_demo_data.py")
    trained = time.perf_counter()
    step(FINETUNE, "eval", run, "--compare-base", "--batch-size", "25")
    results = json.loads((ROOT / run / "eval.json").read_text())["results"]
    base, tuned = results["base"], results["tuned"]
    gain = tuned["strict_accuracy"] - base["strict_accuracy"]
    print(f"\nheld-out answer accuracy ({tuned['rows']} sums): strict {base['strict_accuracy']:.3f} -> "
          f"{tuned['strict_accuracy']:.3f} (gain {gain:+.3f}, bar +{BAR}); lenient {base['lenient_accuracy']:.3f} -> "
          f"{tuned['lenient_accuracy']:.3f}; mean reward {base['reward']:.3f} -> {tuned['reward']:.3f}. Training "
          f"took {(trained - start) / 60:.1f} min, the demo {(time.perf_counter() - start) / 60:.1f} min; reward curve "
          f"in {run}/loss.png, sampled completions in {run}/completions.jsonl")
    if args.out:
        write_table(args.out, run, results, trained - start)
    if gain < BAR:
        print(f"FAILED: strict accuracy gained {gain:+.3f}, less than the bar +{BAR}", file=sys.stderr)
        return 1
    return 0


def write_table(out: Path, run: str, results: dict, seconds: float) -> None:
    """The run's reward curve (every tenth logged step) and the held-out accuracies, as BENCHMARKS.md shows them."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench import machine
    from finetune.run.report import read_metrics

    logged = [r for r in read_metrics(ROOT / run / "metrics.jsonl") if r.get("reward") is not None]
    names = sorted(k for k in logged[0] if k.startswith("rewards/") and k.endswith("/mean"))
    lines = [f"`{shlex.join(['python', 'scripts/grpo_demo.py', *sys.argv[1:]])}` — {time.strftime('%Y-%m-%d')} — "
             f"{machine()}", "", f"recipes/grpo-demo.yaml, training {seconds / 60:.1f} min", "",
             "| step | reward (mean ± std, sampled) | " + " | ".join(n[len("rewards/"):-len("/mean")] for n in names)
             + " | completion tokens | s / step |", "|---|---|" + "---|" * len(names) + "---|---|"]
    for r in logged[1::2] if len(logged) > 12 else logged:
        lines.append(f"| {r['step']} | {r['reward']:.3f} ± {r['reward_std']:.3f} | "
                     + " | ".join(f"{r[n]:.3f}" for n in names)
                     + f" | {r['completions/mean_length']:.1f} | {r['step_seconds']:.1f} |")
    lines += ["", "| model | strict accuracy | lenient accuracy | mean reward | held-out prompts |",
              "|---|---|---|---|---|"]
    for name, m in results.items():
        lines.append(f"| {name} | {m['strict_accuracy']:.3f} | {m['lenient_accuracy']:.3f} | {m['reward']:.3f} | "
                     f"{m['rows']} |")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
