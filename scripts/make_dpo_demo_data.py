"""Write the preference demo's pairs: the same date questions as the SFT demo, answered in a house style.

The chosen answer states the date as `ISO date: YYYY-MM-DD`; the rejected one is the bare date. Both are correct, so
what the pairs teach is the style alone, which SmolLM2-135M-Instruct does not have: its base ranks the bare date
higher on nearly every pair (it is shorter, and the prefix is no phrase it uses). Deterministic (seeded); every row
has its own calendar date, so the pairs a run holds out (data.eval_fraction) never repeat a training row's.
Usage: python scripts/make_dpo_demo_data.py [--out data/dpo-demo/pairs.jsonl] [--rows 400] [--seed 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import PROMPT, WRITTEN_FORMS  # the SFT demo's questions (after the sys.path line above)

STYLE = "ISO date: {iso}"


def pair(date: dt.date, rng: random.Random) -> dict:
    return {"prompt": PROMPT.format(written=rng.choice(WRITTEN_FORMS)(date)),
            "chosen": STYLE.format(iso=date.isoformat()), "rejected": date.isoformat()}


def make(rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    first, last = dt.date(1950, 1, 1).toordinal(), dt.date(2049, 12, 31).toordinal()
    return [pair(dt.date.fromordinal(o), rng) for o in rng.sample(range(first, last + 1), rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/dpo-demo/pairs.jsonl"))
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rows = make(args.rows, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(rows)} pairs to {args.out}")


if __name__ == "__main__":
    main()
