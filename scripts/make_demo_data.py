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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, test = make(args.train, args.test, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
