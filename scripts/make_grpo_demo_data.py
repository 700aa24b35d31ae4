"""Write the reward demo's prompts: small sums, asked for as a bare number, with the answer in a column of its own.

SmolLM2-135M-Instruct answers them its own way (`7 + 8 = 15`, often wrong past single digits, sometimes followed by
a sentence) and gets about a third right: every group of sampled answers holds some reward to learn from. The demo's
strict reward wants the reply to end with the right sum, its lenient one the right sum as the reply's last number
whatever follows, so the held-out report shows apart what GRPO teaches: correct sums, and ending on them.
Deterministic (seeded); training and held-out files share no (a, b) pair.
Usage: python scripts/make_grpo_demo_data.py [--out data/grpo-demo] [--train 600] [--test 100] [--seed 1]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import write_splits  # the demos' shared command line (after the sys.path line above)

PROMPT = "What is {a} + {b}? Reply with only the number."
#: Operands: sums of one- and two-digit numbers, which the base model gets right often enough for a group of
#: completions to hold a reward worth learning from, but not always.
LOW, HIGH = 1, 30


def make(train: int, test: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    rng.shuffle(pairs)
    if train + test > len(pairs):
        raise SystemExit(f"--train + --test must be at most {len(pairs)} (the distinct sums of {LOW}..{HIGH})")
    rows = [{"prompt": PROMPT.format(a=a, b=b), "answer": str(a + b)} for a, b in pairs[:train + test]]
    return rows[:train], rows[train:]


if __name__ == "__main__":
    write_splits(make, __doc__.splitlines()[0], "data/grpo-demo", 600, 100, 1)
