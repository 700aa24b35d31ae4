"""Write the demo task: normalise a date written in English to ISO 8601 (YYYY-MM-DD).

Deterministic (seeded). Train and test use disjoint calendar dates, so a test row is never a rephrasing of a
train row: the model must learn the mapping (month names to numbers, zero padding, ordinals), not recall
answers. Usage: python scripts/make_demo_data.py [--out data/demo] [--train 2000] [--test 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

PROMPT = "Convert this date to ISO 8601 (YYYY-MM-DD): {written}"
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WRITTEN_FORMS = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]}. {d.day}, {d.year}",
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{d.strftime('%A')}, {MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",
    lambda d: f"{d.day}-{MONTHS[d.month - 1][:3]}-{d.year}",
    lambda d: f"{ordinal(d.day)} {MONTHS[d.month - 1]} {d.year}",
]


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def row(date: dt.date, rng: random.Random) -> dict:
    written = rng.choice(WRITTEN_FORMS)(date)
    return {"messages": [
        {"role": "user", "content": PROMPT.format(written=written)},
        {"role": "assistant", "content": date.isoformat()},
    ]}


def make(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    first, last = dt.date(1950, 1, 1).toordinal(), dt.date(2049, 12, 31).toordinal()
    ordinals = rng.sample(range(first, last + 1), n_train + n_test)  # distinct dates: disjoint splits
    dates = [dt.date.fromordinal(o) for o in ordinals]
    return [row(d, rng) for d in dates[:n_train]], [row(d, rng) for d in dates[n_train:]]


def write_splits(make, description: str, out: str, train: int, test: int, seed: int) -> None:
    """The command line every demo's data generator shares: `make(train, test, seed)` -> (train rows, test rows),
    written as train.jsonl and test.jsonl under --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--train", type=int, default=train)
    parser.add_argument("--test", type=int, default=test)
    parser.add_argument("--seed", type=int, default=seed)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("train", "test"), make(args.train, args.test, args.seed)):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    write_splits(make, __doc__.splitlines()[0], "data/demo", 2000, 200, 0)
