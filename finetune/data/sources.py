"""Where rows come from: local files (read by suffix), dataset directories, hub datasets.

A path that exists locally is read locally and never looked up on the hub; a local file whose suffix finetune
cannot read is refused by name. Rows are numbered from 1: the line of a JSONL file, the index of a JSON array,
Parquet, CSV/TSV (header excluded) or `datasets` row.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from finetune.data.formats import flat_format_problem
from finetune.errors import UserError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
#: Suffixes that make a name a file (missing, or unsupported) rather than a hub dataset id.
PATH_SUFFIXES = DATA_SUFFIXES + (".txt", ".md", ".gz", ".zip", ".xlsx", ".xls", ".arrow")


def unsupported_suffix(path: Path) -> str | None:
    """Why a local file cannot be read, or None when its suffix is one finetune reads."""
    if path.is_dir() or path.suffix.lower() in DATA_SUFFIXES:
        return None
    return (f"unsupported file type `{path.suffix or '(no suffix)'}`; finetune reads {', '.join(DATA_SUFFIXES)} "
            "files, dataset directories and hub dataset ids")


def read_records(source: str, split: str) -> Iterator[tuple[int, Any]]:
    """(row number, row) pairs; a row that cannot be parsed comes as the exception, so it is reported, not fatal."""
    path = Path(source).expanduser()
    if path.is_dir():
        yield from enumerate(_load_dataset(str(path), split, f"dataset directory `{source}`"), start=1)
    elif path.exists():
        problem = unsupported_suffix(path)
        if problem:
            raise UserError(f"{source}: {problem}")
        yield from READERS[path.suffix.lower()](path, source)
    elif source.startswith(("/", "./", "../", "~")) or source.lower().endswith(PATH_SUFFIXES):
        raise UserError(f"{source}: data file not found (relative paths are taken from the current directory)")
    else:
        yield from enumerate(_load_dataset(source, split, f"hub dataset `{source}`"), start=1)


def count_rows(source: str, split: str) -> int:
    """Exact row count of a local source; JSONL lines and Parquet footers are counted without parsing rows."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    if path.is_file() and path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for _ in read_records(source, split))


def _jsonl(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    # Bytes go to json.loads, which detects the encoding per line: a UTF-8 byte-order mark (Windows editors write
    # one) no longer costs the first row.
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except ValueError as err:  # bad JSON, or bytes that are not UTF-8
                    yield number, err


def _json(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise UserError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{source}: not valid JSON (line {err.lineno}): {err.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(f"{source}: a .json data file must hold a list of rows (or {{\"data\": [...]}})")
    yield from enumerate(data, start=1)


def _parquet(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{source}: not a readable Parquet file: {err}") from None
    yield from enumerate(table.to_pylist(), start=1)


def _delimited(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    """CSV/TSV through `datasets`' csv builder, every column read as text (no number or "NA" guessing)."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle, delimiter=delimiter), None)
    except UnicodeDecodeError as err:
        raise UserError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not header:
        raise UserError(f"{source}: empty file (no header row)")
    problem = flat_format_problem(header)
    if problem:
        raise UserError(f"{source}: {problem}")
    import datasets

    features = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        rows = datasets.load_dataset("csv", data_files=str(path), split="train", delimiter=delimiter,
                                     features=features, keep_default_na=False, encoding="utf-8-sig")
    except Exception as err:  # ragged rows, duplicate columns: pandas' and arrow's own words name them
        raise UserError(f"{source}: could not read it as {path.suffix.lower()[1:].upper()}: {err}") from None
    yield from enumerate(rows, start=1)


READERS = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet, ".csv": _delimited, ".tsv": _delimited}


def _load_dataset(name: str, split: str, what: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # network, missing split, missing dataset: all the user's to fix
        local = "" if what.startswith("dataset directory") else " Offline? Point data.train/data.eval at a local file."
        raise UserError(f"could not load {what} split `{split}`: {err}.{local}") from None
