"""Rows read and normalised to chat messages, before any tokenizer: what a source gave, the refused rows with file
and row, the seeded held-out split, and the held-out rows as a run saves them."""

from __future__ import annotations

import base64
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from finetune.data.formats import first_row_format, object_row, row_document, row_messages
from finetune.data.images import ImageRef, extract_images
from finetune.data.sources import read_records, row_name, row_origin
from finetune.data.text import EmptyDocument, TextOptions
from finetune.errors import UserError
from finetune.paths import write_atomic

_SHOWN_PROBLEMS = 10



@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    source: str
    row: int  # 1-based: the line of a JSONL file, the index of a JSON array or Parquet/CSV/hub row
    tools: list[dict] | None = None  # tool schemas the row offers the assistant (finetune.data.tools)
    images: list | None = None  # ImageRefs, in the order of the `<image>` placeholders (finetune.data.images)
    text: str | None = None  # a text row's document (format text; messages is then empty)


def ignored_line(source: str, ignored: dict) -> str | None:
    """The fields no format uses, with how many rows carried each (None when there were none)."""
    if not ignored:
        return None
    fields = ", ".join(f"{name} ({count} rows)" for name, count in sorted(ignored.items()))
    return f"ignored fields in {source}: {fields}"


@dataclass
class SourceRows:
    """What reading one source gave: usable rows, refused rows, and the fields no format uses."""

    source: str
    format: str | None = None
    rows: list[Conversation] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    total: int = 0
    ignored: Counter = field(default_factory=Counter)  # field name -> rows that carried it
    empty: int = 0  # empty text documents, skipped (finetune.data.text)

    def ignored_line(self) -> str | None:
        return ignored_line(self.source, self.ignored)

    def refused_fraction(self) -> float:
        return len(self.problems) / self.total if self.total else 0.0


def held_out_indices(pool: list[int], fraction: float, seed: int) -> list[int]:
    """The seeded held-out draw over the rows that normalised (file order): the one split training, `finetune
    eval --recipe` and the preference data all use, so eval never scores rows the run trained on."""
    if fraction <= 0 or not pool:
        return []
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return sorted(pool[i] for i in order[:max(1, round(fraction * len(pool)))])


def load_conversations(source: str, split: str, format: str, log=None, columns: dict | None = None,
                       text: TextOptions | None = None) -> tuple[list[Conversation], list[str], int]:
    """Every row of a source normalised to messages (text rows to their document); refused rows become problem
    lines, not exceptions. With `log`, the fields no format uses are listed there once for the source."""
    read = read_source(source, split, format, columns=columns, text=text)
    if read.total == 0:
        raise UserError(f"{source}: no rows")
    if log is not None and read.ignored:
        log(escape(read.ignored_line()))
    return read.rows, read.problems, read.total


def read_source(source: str, split: str, format: str, keep: bool = True, columns: dict | None = None,
                media: bool = False, text: TextOptions | None = None) -> SourceRows:
    """Read and normalise every row of a source; `keep=False` counts and checks rows without keeping them. `media`:
    rows with images (for a vision-language model), each image checked. Empty text documents are counted apart:
    skipped, not refused (finetune.data.text)."""
    read = SourceRows(source, None if format == "auto" else format)
    for number, row, read.format in normalised_rows(source, split, format, columns, media=media, text=text):
        read.total += 1
        if isinstance(row, EmptyDocument):
            read.empty += 1
            continue
        if isinstance(row, ValueError):
            read.problems.append(f"{row_name(source, number)}: {row}")
            continue
        messages, ignored, tools, images = row
        if ignored:
            read.ignored.update(ignored)
        if keep and isinstance(messages, str):  # a text row: its document
            read.rows.append(Conversation([], source, number, text=messages))
        elif keep:
            read.rows.append(Conversation(messages, source, number, tools, images))
    return read


def normalised_rows(source: str, split: str, format: str, columns: dict | None = None, streaming: bool = False,
                    media: bool = False, text: TextOptions | None = None):
    """(row number, (messages, ignored fields, tools, images) or the ValueError refusing the row, the format) for
    every row of a source; the format is detected from its first object row, where preference data is refused for
    the file. Images are None unless `media` (finetune.data.images: paths relative to the row's own file). A text
    row gives its document (a str) in place of the messages."""
    fmt = None if format == "auto" else format
    detected, text = False, text or TextOptions()
    columns = text.columns(columns)
    for number, value in read_records(source, split, streaming, text.split_on):
        try:
            record, images = object_row(value, columns), None
            if media:
                record, images = extract_images(record, row_folder(source, number))
            if not detected:
                fmt, detected = first_row_format(record, fmt, row_name(source, number)), True
            if fmt == "text":
                yield number, (*row_document(record), None, None), fmt
            else:
                yield number, (*row_messages(record, fmt, media), images), fmt
        except ValueError as err:
            yield number, err, fmt


def row_folder(source: str, number: int) -> Path | None:
    """The folder of the file a row is in (None for a hub dataset): where its relative image paths start."""
    file = Path(row_origin(source, number)[0]).expanduser()
    return file.parent if file.exists() else None


def split_held_out(rows: list[Conversation], fraction: float, seed: int):
    """Seeded split; the held-out rows are saved with the run so `finetune eval` reuses exactly them."""
    held = set(held_out_indices(list(range(len(rows))), fraction, seed))
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
    """One JSON object per row, written whole or not at all (finetune.paths.write_atomic)."""
    lines = []
    for conv in rows:
        if conv.text is not None:  # a held-out document, as `finetune eval` reads it back
            lines.append(json.dumps({"text": conv.text, "source": conv.source, "row": conv.row}) + "\n")
            continue
        saved = {"messages": conv.messages, "source": conv.source, "row": conv.row}
        if conv.tools:
            saved["tools"] = conv.tools
        if conv.images:
            saved["images"] = [image.record() for image in conv.images]
        lines.append(json.dumps(saved) + "\n")
    write_atomic(path, "".join(lines))


def read_saved_conversations(path: Path, documents: bool = True) -> list[Conversation]:
    """The rows of a held_out.jsonl; `documents=False` leaves out text documents (for what needs conversations). A
    preference run's rows become their prompt and the answer to prefer (a pair's chosen one, a labelled answer
    marked desirable), what merge and export check the weights on."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in filter(str.strip, handle):
            row = json.loads(line)
            if "text" in row and not documents:
                continue
            if "prompt" in row and ("chosen" in row or "completion" in row):
                if not row.get("label", True):
                    continue
                answer = row.pop("chosen", None) or row.pop("completion")
                row = {k: v for k, v in row.items() if k in ("source", "row", "tools", "images")} | {
                    "messages": row["prompt"] + [answer]}
            row.setdefault("messages", [])
            if row.get("images"):
                row["images"] = [ImageRef(i["kind"], base64.b64decode(i["value"]) if i["kind"] == "bytes"
                                          else i["value"]) for i in row["images"]]
            rows.append(Conversation(**row))
    return rows
