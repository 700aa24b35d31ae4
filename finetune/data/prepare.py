"""Rows in, token ids with assistant-only labels out.

Reads every row of a source (see sources.py), normalises it to chat `messages` (formats.py), renders it with the
ChatML template and masks the loss to trained assistant tokens (template.py). Refused rows are reported with file
and row number; the run refuses to start when too many are bad.

Tokenisation happens here rather than inside TRL so that every row's fate is known and reported before
training: TRL would silently drop rows whose assistant tokens all fall past `max_length`.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from finetune.data.formats import first_row_format, normalise
from finetune.data.sources import read_records
from finetune.data.template import encode
from finetune.errors import UserError

_SHOWN_PROBLEMS = 10


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    source: str
    row: int  # 1-based: the line of a JSONL file, the index of a JSON array or Parquet/CSV/hub row


@dataclass
class SourceRows:
    """What reading one source gave: usable rows, refused rows, and the fields no format uses."""

    source: str
    format: str | None = None
    rows: list[Conversation] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    total: int = 0
    ignored: Counter = field(default_factory=Counter)  # field name -> rows that carried it

    def ignored_line(self) -> str | None:
        if not self.ignored:
            return None
        fields = ", ".join(f"{name} ({count} rows)" for name, count in sorted(self.ignored.items()))
        return f"ignored fields in {self.source}: {fields}"

    def refused_fraction(self) -> float:
        return len(self.problems) / self.total if self.total else 0.0


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    eval_conversations: list[Conversation]
    mean_train_tokens: float
    problems: list[str] = field(default_factory=list)


def build_datasets(
    tokenizer,
    train: str,
    train_split: str,
    eval: str | None,
    eval_split: str,
    eval_fraction: float,
    format: str,
    max_length: int,
    max_bad_fraction: float,
    seed: int,
    log=print,
) -> PreparedData:
    """Load, normalise, split and tokenise; raise UserError when too many rows are bad."""
    from datasets import Dataset

    train_rows, problems, total = load_conversations(train, train_split, format, log)
    if eval is not None:
        eval_rows, eval_problems, eval_total = load_conversations(eval, eval_split, format, log)
        problems += eval_problems
        total += eval_total
    else:
        train_rows, eval_rows = split_held_out(train_rows, eval_fraction, seed)

    encoded = {}
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        kept_rows, columns = [], {"input_ids": [], "labels": []}
        for conv in rows:
            ids, labels = encode(tokenizer, conv.messages, max_length)
            if all(label == -100 for label in labels):
                problems.append(f"{conv.source}:{conv.row}: no assistant token left within max_length={max_length}"
                                " (raise data.max_length or shorten the row)")
                continue
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
            kept_rows.append(conv)
        encoded[name] = (kept_rows, columns)

    check_bad_fraction(problems, total, max_bad_fraction, log)
    train_rows, train_columns = encoded["train"]
    eval_rows, eval_columns = encoded["eval"]
    if not train_rows:
        raise UserError(f"{train}: no usable training rows")
    mean_tokens = sum(map(len, train_columns["input_ids"])) / len(train_rows)
    return PreparedData(
        train=Dataset.from_dict(train_columns),
        eval=Dataset.from_dict(eval_columns) if eval_rows else None,
        eval_conversations=eval_rows,
        mean_train_tokens=mean_tokens,
        problems=problems,
    )


def load_conversations(source: str, split: str, format: str, log=None) -> tuple[list[Conversation], list[str], int]:
    """Every row of a source normalised to messages; refused rows become problem lines, not exceptions.

    With `log`, the fields no format uses are listed there once for the source."""
    read = read_source(source, split, format)
    if read.total == 0:
        raise UserError(f"{source}: no rows")
    if log is not None and read.ignored:
        log(escape(read.ignored_line()))
    return read.rows, read.problems, read.total


def read_source(source: str, split: str, format: str, limit: int | None = None) -> SourceRows:
    """Read and normalise a source; with `limit`, only its first rows (the rest are neither read nor counted)."""
    read = SourceRows(source, None if format == "auto" else format)
    detected = False
    for number, record in read_records(source, split):
        if limit is not None and read.total >= limit:
            break
        read.total += 1
        where = f"{source}:{number}"
        try:
            if isinstance(record, Exception):
                raise ValueError(f"not valid JSON: {record}")
            if not isinstance(record, dict):
                raise ValueError(f"expected an object, got {type(record).__name__}")
            if not detected:
                read.format, detected = first_row_format(record, read.format, where), True
            messages, ignored = normalise(record, read.format)
        except ValueError as err:
            read.problems.append(f"{where}: {err}")
            continue
        read.ignored.update(ignored)
        read.rows.append(Conversation(messages, source, number))
    return read


def split_held_out(rows: list[Conversation], fraction: float, seed: int):
    """Seeded split; the held-out rows are saved with the run so `finetune eval` reuses exactly them."""
    if fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(rows)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def check_bad_fraction(problems: list[str], total: int, limit: float, log) -> None:
    if not problems:
        return
    shown = "\n".join(f"  - {p}" for p in problems[:_SHOWN_PROBLEMS])
    more = f"\n  ... and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
    summary = f"{len(problems)} of {total} rows unusable ({len(problems) / total:.1%}):\n{shown}{more}"
    if len(problems) / total > limit:
        raise UserError(f"{summary}\nThat is more than data.max_bad_fraction={limit}; fix the data, set "
                        "data.format, or raise data.max_bad_fraction to train on the other rows only.")
    log(f"[yellow]skipping {escape(summary)}[/yellow]")


def save_conversations(rows: list[Conversation], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for conv in rows:
            handle.write(json.dumps({"messages": conv.messages, "source": conv.source, "row": conv.row}) + "\n")


def read_saved_conversations(path: Path) -> list[Conversation]:
    with path.open(encoding="utf-8") as handle:
        return [Conversation(**json.loads(line)) for line in handle if line.strip()]
