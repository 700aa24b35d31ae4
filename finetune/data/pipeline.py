"""One source to token ids on Arrow: rows are read as text into a memory-mapped dataset, then parsed, normalised,
rendered and masked by `datasets.map` over several processes (each row's fate kept in the output: its samples, or
the reason it was refused, and at which stage).

Memory stays flat whatever the number of rows: rows and samples live in Arrow files on disk, and only the refused
rows' reasons and the held-out rows come back as Python objects.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.formats import first_row_format, object_row, row_document, row_messages
from finetune.data.mixture import rename
from finetune.data.sources import local_bytes, row_name, text_rows
from finetune.data.template import ChatTemplate, fit_messages, trained_samples
from finetune.data.text import EmptyDocument, TextOptions, document_samples, resolved, text_stats
from finetune.errors import UserError

#: Row stages in the encoded dataset: a sample, a row refused while normalising (not in the held-out split's pool,
#: as before any template is involved), a row refused by the template or max_length, an empty text document
#: (skipped and counted, not refused: outside the pool too, as it has nothing to hold out).
SAMPLE, REFUSED_FORMAT, REFUSED_TEMPLATE, SKIPPED_EMPTY = 0, 1, 2, 3
#: Rows per `map` batch: large enough to amortise the batch overhead, small enough to keep a worker's memory flat.
BATCH = 500
#: Below this many rows per process, starting processes costs more than it saves.
ROWS_PER_PROCESS = 2000


@dataclass
class Encoded:
    """A source after preparation: its encoded rows, which of them are samples, its refused rows and counts."""

    source: str
    encoded: Any  # datasets.Dataset: row, input_ids, labels, truncated, stage, problem, ignored
    samples: Any  # numpy positions in `encoded` of the samples (file order)
    sample_rows: Any  # numpy: the file row of each sample
    problems: list[str]
    ignored: dict[str, int]
    rows_read: int
    pool: list[int]  # rows that normalised, in file order: the held-out split draws from these
    raw: Any  # datasets.Dataset of the row texts, to rebuild held-out conversations
    format: str
    columns: dict[str, str]
    text: TextOptions | None = None
    stats: dict | None = None  # a text source's documents, blocks and tokens (finetune.data.text.text_stats)


#: Sources smaller than this prepare in seconds: their progress bars would be noise around the report.
QUIET_BYTES = 8 << 20


@contextmanager
def progress_bars(paths: list[str]):
    """datasets' progress bars on for sources that take a while (large files, hub datasets), off for small files."""
    import datasets

    small = all((size := local_bytes(p)) is not None and size < QUIET_BYTES for p in paths)
    was_on = datasets.is_progress_bar_enabled()
    if small:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if small and was_on:
            datasets.enable_progress_bars()


def processes(rows: int, wanted: int | None) -> int:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(wanted or available, rows // ROWS_PER_PROCESS))


def encode_source(source: str, split: str, format: str, tokenizer, template: ChatTemplate, max_length: int,
                  work: Path, num_proc: int | None = None, tag: str = "", columns: dict | None = None,
                  index: int = 0, text: TextOptions | None = None) -> Encoded:
    """The source's rows encoded; `index` (its place in the run's list of sources) marks each sample's origin."""
    import datasets
    import numpy as np
    import pyarrow.compute as pc

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked: one thread each
    text = text or TextOptions()
    try:
        raw = datasets.Dataset.from_generator(
            _raw_rows, gen_kwargs={"source": source, "split": split, "tag": tag, "split_on": text.split_on},
            cache_dir=str(work / "raw"),
            features=datasets.Features({"row": datasets.Value("int64"), "text": datasets.Value("string"),
                                        "error": datasets.Value("string")}))
    except Exception as err:  # datasets wraps what the reader raised (a missing split, an unreadable file)
        cause = err
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        raise (cause or err) from None
    if len(raw) == 0:
        raise UserError(f"{source}: no rows")
    columns = text.columns(columns)
    fmt = _detect(raw, source, None if format == "auto" else format, columns)
    features = datasets.Features({
        "row": datasets.Value("int64"), "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")), "truncated": datasets.Value("bool"),
        "stage": datasets.Value("int8"), "problem": datasets.Value("string"),
        "ignored": datasets.Sequence(datasets.Value("string")), "source": datasets.Value("int64")})
    workers = processes(len(raw), num_proc)
    # datasets' map(num_proc=N) leaves a copy of os.environ in its place; code holding the original (pytest's
    # monkeypatch, a launcher) would no longer see or restore the process's variables.
    environ = os.environ
    try:
        encoded = raw.map(
            _encode_batch, batched=True, batch_size=BATCH, num_proc=workers if workers > 1 else None,
            remove_columns=raw.column_names, features=features, new_fingerprint=f"{tag}-encoded",
            fn_kwargs={"tokenizer": tokenizer, "template": template, "fmt": fmt, "max_length": max_length,
                       "columns": columns, "index": index, "text": text},
            desc=f"preparing {Path(source).name}")
    finally:
        os.environ = environ  # noqa: B003 - puts the original mapping back (see above); it clears nothing
    table = encoded.data
    stage = table.column("stage").to_numpy()
    rows = table.column("row").to_numpy()
    refused = (stage != SAMPLE) & (stage != SKIPPED_EMPTY)
    reasons = encoded.select_columns(["row", "problem"]).select(np.flatnonzero(refused)).to_dict()
    problems = [f"{row_name(source, row)}: {reason}" for row, reason in zip(reasons["row"], reasons["problem"])]
    counts = pc.value_counts(pc.list_flatten(table.column("ignored"))).to_pylist()
    ignored = {entry["values"]: entry["counts"] for entry in counts}
    normalised = rows[(stage != REFUSED_FORMAT) & (stage != SKIPPED_EMPTY)]
    pool = normalised[np.concatenate(([True], normalised[1:] != normalised[:-1]))] if len(normalised) else normalised
    samples = np.flatnonzero(stage == SAMPLE)
    stats = None
    if fmt == "text":
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy()[samples]
        # Rows that are no sample carry no labels, so the whole column counts the samples' trained tokens.
        trained = pc.sum(pc.not_equal(pc.list_flatten(table.column("labels")), -100)).as_py() or 0
        stats = {**text_stats(rows[samples], lengths, trained), "empty": int((stage == SKIPPED_EMPTY).sum())}
    return Encoded(source, encoded, samples, rows[samples], problems, ignored, len(raw), pool.tolist(), raw, fmt,
                   columns, text, stats)


def _raw_rows(source: str, split: str, tag: str, split_on: str = "document"):
    """Every row as JSON text; a row that cannot be decoded carries its error. JSON Lines files pass their lines
    through unparsed (the workers parse them), other sources are read and written as JSON text. `tag` (the
    preparation's key) only makes `datasets`' own generator cache tell different inputs apart."""
    for number, value in text_rows(source, split, split_on):
        if isinstance(value, Exception):
            yield {"row": number, "text": "", "error": f"not valid JSON: {value}"}
        elif isinstance(value, str):
            yield {"row": number, "text": value, "error": ""}
        else:
            yield {"row": number, "text": json.dumps(value, ensure_ascii=False, default=str), "error": ""}


def _detect(raw, source: str, format: str | None, columns: dict) -> str:
    """The file's format from its first object row (preference data is refused here, for the whole file)."""
    head = raw.select(range(min(1000, len(raw)))).to_dict()
    for row, text, error in zip(head["row"], head["text"], head["error"]):
        record = _parse(text, error, raise_errors=False)
        if isinstance(record, dict):
            return first_row_format(rename(record, columns), format, row_name(source, row))
    if format is not None:
        return format
    raise UserError(f"{source}: no row of the first 1000 is a JSON object, so its format cannot be detected")


def _parse(text: str, error: str, raise_errors: bool = True):
    try:
        if error:
            raise ValueError(error)
        try:
            return json.loads(text)
        except ValueError as err:
            raise ValueError(f"not valid JSON: {err}") from None
    except ValueError:
        if raise_errors:
            raise
        return None


def _encode_batch(batch: dict, tokenizer, template: ChatTemplate, fmt: str, max_length: int, columns: dict,
                  index: int, text: TextOptions | None = None) -> dict:
    out: dict[str, list] = {k: [] for k in ("row", "input_ids", "labels", "truncated", "stage", "problem", "ignored",
                                            "source")}

    def emit(row, stage, problem="", ids=(), labels=(), truncated=False, ignored=()):
        values = (row, list(ids), list(labels), truncated, stage, problem, sorted(ignored), index)
        for key, value in zip(out, values):
            out[key].append(value)

    if fmt == "text":
        _encode_documents(batch, tokenizer, max_length, columns, text or TextOptions(), emit)
        return out
    for row, text, error in zip(batch["row"], batch["text"], batch["error"]):
        try:
            messages, ignored, tools = row_messages(object_row(_parse(text, error), columns), fmt)
        except ValueError as err:
            emit(row, REFUSED_FORMAT, str(err))
            continue
        try:
            samples = trained_samples(tokenizer, messages, max_length, tools, template)
        except ValueError as err:
            emit(row, REFUSED_TEMPLATE, str(err), ignored=ignored)
            continue
        for number, sample in enumerate(samples):
            emit(row, SAMPLE, "", sample.input_ids, sample.labels, sample.truncated, ignored if number == 0 else ())
    return out


def _encode_documents(batch: dict, tokenizer, max_length: int, columns: dict, options: TextOptions, emit) -> None:
    """Text rows: each document's blocks (finetune.data.text), every token trained; empty documents skipped."""
    options = resolved(options, tokenizer)
    for row, text, error in zip(batch["row"], batch["text"], batch["error"]):
        try:
            document, ignored = row_document(object_row(_parse(text, error), columns))
            samples = document_samples(tokenizer, document, max_length, options)
        except EmptyDocument as err:
            emit(row, SKIPPED_EMPTY, str(err))
            continue
        except ValueError as err:
            emit(row, REFUSED_FORMAT, str(err))
            continue
        for number, sample in enumerate(samples):
            emit(row, SAMPLE, "", sample.input_ids, sample.labels, False, ignored if number == 0 else ())


def conversations(encoded: Encoded, rows: list[int], template: ChatTemplate) -> list:
    """The given rows (file row numbers) as fitted Conversations, rebuilt from their text: held-out rows for
    held_out.jsonl and `finetune eval`."""
    import numpy as np

    from finetune.data.rows import Conversation

    if not rows:
        return []
    raw_rows = encoded.raw.data.column("row").to_numpy()
    positions = np.searchsorted(raw_rows, np.asarray(rows))
    picked = encoded.raw.select(positions).to_dict()
    out = []
    for row, text, error in zip(picked["row"], picked["text"], picked["error"]):
        record = object_row(_parse(text, error), encoded.columns)
        if encoded.format == "text":
            out.append(Conversation([], encoded.source, row, text=row_document(record)[0]))
            continue
        messages, _, tools = row_messages(record, encoded.format)
        out.append(Conversation(fit_messages(template, messages), encoded.source, row, tools))
    return out


def sample_features():
    import datasets

    return datasets.Features({"row": datasets.Value("int64"), "input_ids": datasets.Sequence(datasets.Value("int32")),
                              "labels": datasets.Sequence(datasets.Value("int32")), "truncated": datasets.Value("bool"),
                              "source": datasets.Value("int64")})


def select_samples(encoded: Encoded, times):
    """The samples repeated `times` each (an int array over `encoded.samples`; 0 leaves one out) as a dataset of
    source (its index in the run's list), row, input_ids, labels and truncated: a selection over the encoded rows,
    which `save_to_disk` writes once (adding a column instead would copy every sample first)."""
    import numpy as np

    positions = np.repeat(encoded.samples, times)
    return encoded.encoded.select(positions).select_columns(list(sample_features()))


def sample_tokens(encoded: Encoded, times) -> int:
    """Tokens in the samples repeated `times` each (see select_samples)."""
    import numpy as np
    import pyarrow.compute as pc

    lengths = pc.list_value_length(encoded.encoded.data.column("input_ids")).to_numpy()
    return int((lengths[encoded.samples] * np.asarray(times)).sum())
