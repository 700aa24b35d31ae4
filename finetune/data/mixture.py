"""Several training sources in one run: each with its own path, split, format and column names, and a share of the
training rows given as a `weight` or a fixed number of `rows`.

The draw is deterministic under the seed. A source asked for n rows out of the m it has gives every row n // m
times and a seeded sample of n % m more, so up- and down-sampling follow one rule and no row repeats more than
needed. Weighted sources share the rows they have between them (their sum), split by weight; sources with `rows`
give exactly that many; sources with neither give each row once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Source:
    """One training source, as `data.sources` lists it (a plain `data.train` is one Source)."""

    path: str
    split: str = "train"
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict, hash=False)  # format field -> the file's field
    weight: float | None = None
    rows: int | None = None

    def key(self) -> dict:
        return {"path": self.path, "split": self.split, "format": self.format, "columns": self.columns,
                "weight": self.weight, "rows": self.rows}


def rename(record: dict, columns: dict[str, str]) -> dict:
    """The row with the file's field names mapped to the format's (`columns: {prompt: question}` reads `question` as
    `prompt`); a row without a mapped field keeps what it has, and its format then names what is missing."""
    if not columns:
        return record
    renamed = {key: value for key, value in record.items() if key not in columns.values()}
    for target, field_name in columns.items():
        if field_name in record:
            renamed[target] = record[field_name]
    return renamed


def planned_rows(sources: list[Source], available: list[int]) -> list[int]:
    """How many rows each source gives to the training mixture."""
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    total_weight = sum(sources[i].weight for i in weighted)
    pooled = sum(available[i] for i in weighted)
    planned = []
    for source, have in zip(sources, available):
        if source.rows is not None:
            planned.append(source.rows)
        elif source.weight is not None:
            planned.append(round(pooled * source.weight / total_weight) if total_weight else 0)
        else:
            planned.append(have)
    return planned


def draw(rows: list[int], wanted: int, seed: int) -> list[int]:
    """`wanted` rows from `rows` (see the module docstring), sorted."""
    if not rows or wanted <= 0:
        return []
    passes, extra = divmod(wanted, len(rows))
    return sorted(rows * passes + random.Random(seed).sample(rows, extra))
