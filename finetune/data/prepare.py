"""Rows in, token ids with assistant-only labels out.

Reads every row of a source (see sources.py), normalises it to chat `messages` and tools (formats.py, tools.py),
renders it with the run's chat template and masks the loss to what the assistant generates (template.py). Refused
rows are reported with file and row number; the run refuses to start when too many are bad. `finetune data` runs
this same code and reports on it.

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

from finetune.data.formats import first_row_format, normalise, row_tools
from finetune.data.sources import read_records
from finetune.data.template import ChatTemplate, chat_template, encode_samples, fit_messages
from finetune.errors import UserError

_SHOWN_PROBLEMS = 10


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    source: str
    row: int  # 1-based: the line of a JSONL file, the index of a JSON array or Parquet/CSV/hub row
    tools: list[dict] | None = None  # tool schemas the row offers the assistant (finetune.data.tools)


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
    template: ChatTemplate | None = None
    train_conversations: list[Conversation] = field(default_factory=list)  # the row of each training sample
    rows_read: int = 0
    truncated: int = 0  # samples cut at max_length


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
    template: ChatTemplate | None = None,
) -> PreparedData:
    """Load, normalise, split and tokenise with the tokenizer's chat template (or `template`); raise UserError when
    too many rows are bad."""
    from datasets import Dataset

    if template is None:
        try:
            template = chat_template(tokenizer)
        except ValueError as err:
            raise UserError(str(err)) from None
    train_rows, problems, total = load_conversations(train, train_split, format, log)
    if eval is not None:
        eval_rows, eval_problems, eval_total = load_conversations(eval, eval_split, format, log)
        problems += eval_problems
        total += eval_total
    else:
        train_rows, eval_rows = split_held_out(train_rows, eval_fraction, seed)

    encoded, truncated = {}, 0
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        kept_rows, sample_rows, columns = [], [], {"input_ids": [], "labels": []}
        for conv in rows:
            try:
                conv.messages = fit_messages(template, conv.messages)  # held_out.jsonl keeps what was trained
                samples = encode_samples(tokenizer, conv.messages, max_length, conv.tools, template)
            except ValueError as err:
                problems.append(f"{conv.source}:{conv.row}: {err}")
                continue
            samples = [s for s in samples if any(label != -100 for label in s.labels)]
            if not samples:
                problems.append(f"{conv.source}:{conv.row}: no assistant token left within max_length={max_length}"
                                " (raise data.max_length or shorten the row)")
                continue
            for sample in samples:
                columns["input_ids"].append(sample.input_ids)
                columns["labels"].append(sample.labels)
                sample_rows.append(conv)
                truncated += sample.truncated and name == "train"
            kept_rows.append(conv)
        encoded[name] = (kept_rows, columns, sample_rows)

    check_bad_fraction(problems, total, max_bad_fraction, log)
    train_rows, train_columns, train_samples = encoded["train"]
    eval_rows, eval_columns, _ = encoded["eval"]
    if not train_rows:
        raise UserError(f"{train}: no usable training rows")
    mean_tokens = sum(map(len, train_columns["input_ids"])) / len(train_columns["input_ids"])
    return PreparedData(
        train=Dataset.from_dict(train_columns),
        eval=Dataset.from_dict(eval_columns) if eval_rows else None,
        eval_conversations=eval_rows,
        mean_train_tokens=mean_tokens,
        problems=problems,
        template=template,
        train_conversations=train_samples,
        rows_read=total,
        truncated=truncated,
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


def read_source(source: str, split: str, format: str, keep: bool = True) -> SourceRows:
    """Read and normalise every row of a source; `keep=False` counts and checks rows without keeping them."""
    read = SourceRows(source, None if format == "auto" else format)
    detected = False
    for number, record in read_records(source, split):
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
            tools = row_tools(record)
        except ValueError as err:
            read.problems.append(f"{where}: {err}")
            continue
        if ignored:
            read.ignored.update(ignored)
        if keep:
            read.rows.append(Conversation(messages, source, number, tools))
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
    if len(problems) >= total:  # nothing would train: raising max_bad_fraction is no way out
        raise UserError(f"{summary}\nNo row is usable; fix the data or set data.format.")
    if len(problems) / total > limit:
        raise UserError(f"{summary}\nThat is more than data.max_bad_fraction={limit}; fix the data, set "
                        "data.format, or raise data.max_bad_fraction to train on the other rows only.")
    log(f"[yellow]skipping {escape(summary)}[/yellow]")


def save_conversations(rows: list[Conversation], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for conv in rows:
            saved = {"messages": conv.messages, "source": conv.source, "row": conv.row}
            handle.write(json.dumps({**saved, "tools": conv.tools} if conv.tools else saved) + "\n")


def read_saved_conversations(path: Path) -> list[Conversation]:
    with path.open(encoding="utf-8") as handle:
        return [Conversation(**json.loads(line)) for line in handle if line.strip()]
