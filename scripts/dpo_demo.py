"""`make dpo-demo`: preference tuning on the embedded default, on a CPU, in a few minutes.

Writes the pairs if absent (scripts/make_dpo_demo_data.py), trains recipes/dpo-demo.yaml (DPO with LoRA on
SmolLM2-135M-Instruct) into a fresh run dir, scores base and tuned on the held-out pairs with `finetune eval`, and
fails loudly if the tuned model's preference accuracy misses the bar. Each step is the CLI command a user would type.
"""

from __future__ import annotations

import json
import sys
import time

from demo import (  # the SFT demo's way of running each command
    FINETUNE,
    ROOT,
    fresh_run,
    step,
)

BAR = 0.9  # held-out preference accuracy the tuned model must reach


def main() -> int:
    start = time.perf_counter()
    run = fresh_run("recipes/dpo-demo.yaml", "data/dpo-demo/pairs.jsonl", "scripts/make_dpo_demo_data.py")
    step(FINETUNE, "eval", run, "--batch-size", "16")
    results = json.loads((ROOT / run / "eval.json").read_text())["results"]
    base, tuned = results["base"]["preference_accuracy"], results["tuned"]["preference_accuracy"]
    minutes = (time.perf_counter() - start) / 60
    print(f"\nheld-out preference accuracy (chosen answer more likely than rejected): base {base:.3f} -> tuned "
          f"{tuned:.3f} ({results['tuned']['rows']} pairs; bar {BAR}); reward accuracy "
          f"{results['tuned']['reward_accuracy']:.3f}, margin {results['tuned']['reward_margin']:.2f}; "
          f"demo took {minutes:.1f} min")
    if tuned < BAR:
        print(f"FAILED: tuned preference accuracy {tuned:.3f} is below the bar {BAR}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
