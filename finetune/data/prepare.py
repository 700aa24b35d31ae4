"""Rows in, token ids with assistant-only labels out.

Reads every row of a source (see sources.py), normalises it to chat `messages` and tools (formats.py, tools.py),
renders it with the run's chat template and masks the loss to what the assistant generates (template.py). Refused
rows are reported with file and row number; the run refuses to start when too many are bad. `finetune data` runs
this same code and reports on it.

Tokenisation happens here rather than inside TRL so that every row's fate is known and reported before
training: TRL would silently drop rows whose assistant tokens all fall past `max_length`.
"""

from __future__ import annotations

import atexit
import json
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from finetune.data.cache import cache_key, claimed, is_complete, write_complete
from finetune.data.formats import first_row_format, normalise, row_tools
from finetune.data.pipeline import conversations, encode_source, select_samples
from finetune.data.sources import read_records
from finetune.data.template import ChatTemplate, chat_template
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
    train: Any  # datasets.Dataset with input_ids, labels (memory-mapped Arrow)
    eval: Any | None
    eval_conversations: list[Conversation]
    mean_train_tokens: float
    problems: list[str] = field(default_factory=list)
    template: ChatTemplate | None = None
    train_rows: Any = None  # datasets.Dataset: the source row of each training sample, and whether it was cut
    train_source: str = ""
    rows_read: int = 0
    truncated: int = 0  # samples cut at max_length
    cache: str | None = None  # the cache entry the samples were read from or written to
    ignored_lines: list[str] = field(default_factory=list)  # the fields no format uses, per source
    cache_line: str | None = None  # where the prepared data lives, and whether it was prepared again

    def origin(self, index: int) -> tuple[str, int]:
        return self.train_source, self.train_rows[index]["row"]


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
    cache: bool = True,
    num_proc: int | None = None,
) -> PreparedData:
    """Load, normalise, split and tokenise with the tokenizer's chat template (or `template`), on Arrow over
    `num_proc` processes (default: the cores available), cached on disk under a key of the inputs' content (see
    cache.py); raise UserError when too many rows are bad."""
    if template is None:
        try:
            template = chat_template(tokenizer)
        except ValueError as err:
            raise UserError(str(err)) from None
    # The sources' names too: refusal lines and sample origins name them.
    options = {"train": train, "eval": eval, "train_split": train_split, "eval_split": eval_split,
               "eval_fraction": eval_fraction,
               "format": format, "max_length": max_length, "seed": seed if eval_fraction > 0 else None}
    key = cache_key(tokenizer, template, {"train": train, "eval": eval}, options) if cache else None

    def prepare(directory: Path) -> None:
        _prepare(tokenizer, template, train, train_split, eval, eval_split, eval_fraction, format, max_length,
                 seed, num_proc, directory, key or "uncached")

    if key is None:  # a hub dataset (or data.cache off): prepared in a temporary entry, removed at exit
        directory = Path(tempfile.mkdtemp(prefix="finetune-data-"))
        atexit.register(shutil.rmtree, directory, True)
        prepare(directory)
        data = _load(directory, template)
    else:
        with claimed(key) as directory:
            hit = is_complete(directory)
            if not hit:
                write_complete(directory, prepare)
            data = _load(directory, template)
    for line in data.ignored_lines:
        log(escape(line))
    check_bad_fraction(data.problems, data.rows_read, max_bad_fraction, log)
    if len(data.train) == 0:
        raise UserError(f"{train}: no usable training rows")
    if key is not None:
        data.cache_line = f"data: {'read from' if hit else 'prepared into'} the cache {directory}"
    return data


def _prepare(tokenizer, template, train, train_split, eval, eval_split, eval_fraction, format, max_length, seed,
             num_proc, directory: Path, key: str) -> None:
    """Encode the sources, split off the held-out rows and write the entry: train/ and eval/ datasets,
    held_out.jsonl and meta.json (written last: its presence marks the entry complete)."""
    import numpy as np

    work = directory / "work"
    encoded = encode_source(train, train_split, format, tokenizer, template, max_length, work, num_proc, key)
    problems, rows_read, ignored = list(encoded.problems), encoded.rows_read, [_ignored_line(encoded)]
    rows = encoded.sample_rows
    if eval is not None:
        held_encoded = encode_source(eval, eval_split, format, tokenizer, template, max_length, work / "eval",
                                     num_proc, key + "-eval")
        problems += held_encoded.problems
        rows_read += held_encoded.rows_read
        ignored.append(_ignored_line(held_encoded))
        held_samples = select_samples(held_encoded, None)
        held_rows = sorted(set(held_encoded.sample_rows.tolist()))
        train_samples = select_samples(encoded, None)
    else:
        held = _held_out_rows(encoded.pool, eval_fraction, seed)
        in_held = np.isin(rows, np.asarray(held, dtype=rows.dtype))
        train_samples = select_samples(encoded, ~in_held)
        held_samples = select_samples(encoded, in_held)
        held_encoded = encoded
        held_rows = sorted(set(rows[in_held].tolist()))
    held_out = conversations(held_encoded, held_rows, template, format)
    for name, samples in (("train", train_samples), ("eval", held_samples)):
        if len(samples):  # datasets cannot load back a saved dataset of no rows
            samples.save_to_disk(str(directory / name))
    save_conversations(held_out, directory / "held_out.jsonl")
    shutil.rmtree(work, ignore_errors=True)
    meta = {"train_source": train, "rows_read": rows_read, "problems": problems,
            "ignored_lines": [line for line in ignored if line]}
    (directory / "meta.json").write_text(json.dumps(meta) + "\n")


def _load(directory: Path, template: ChatTemplate) -> PreparedData:
    import datasets

    from finetune.data.pipeline import sample_features
    import pyarrow.compute as pc

    meta = json.loads((directory / "meta.json").read_text())
    held = datasets.load_from_disk(str(directory / "eval")) if (directory / "eval").is_dir() else None
    samples = datasets.load_from_disk(str(directory / "train")) if (directory / "train").is_dir() else \
        datasets.Dataset.from_dict({"row": [], "input_ids": [], "labels": [], "truncated": []}, features=sample_features())
    lengths = pc.list_value_length(samples.data.column("input_ids"))
    data = PreparedData(
        train=samples.select_columns(["input_ids", "labels"]),
        eval=held.select_columns(["input_ids", "labels"]) if held is not None else None,
        eval_conversations=read_saved_conversations(directory / "held_out.jsonl"),
        mean_train_tokens=pc.mean(lengths).as_py() or 0.0,
        problems=meta["problems"],
        template=template,
        train_rows=samples.select_columns(["row", "truncated"]),
        train_source=meta["train_source"],
        rows_read=meta["rows_read"],
        truncated=pc.sum(samples.data.column("truncated")).as_py() or 0,
        cache=str(directory),
        ignored_lines=meta["ignored_lines"],
    )
    return data


def _ignored_line(encoded) -> str | None:
    read = SourceRows(encoded.source, ignored=Counter(encoded.ignored))
    return read.ignored_line()


def _held_out_rows(pool: list[int], fraction: float, seed: int) -> list[int]:
    """The same seeded draw as split_held_out, over the rows that normalised (file order)."""
    if fraction <= 0 or not pool:
        return []
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return sorted(pool[i] for i in order[:max(1, round(fraction * len(pool)))])


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
