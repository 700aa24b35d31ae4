"""Where rows come from: local files (read by suffix), dataset directories, hub datasets.

A path that exists locally is read locally and never looked up on the hub; a local file whose suffix finetune
cannot read is refused by name. Text files may be UTF-8 (with or without a byte-order mark), UTF-16 or UTF-32. A
directory written by `datasets`' `save_to_disk` is read with `load_from_disk`. Rows are numbered from 1: the line of
a JSONL file, the index of a JSON array, Parquet, CSV/TSV (header excluded) or `datasets` row.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.data.formats import flat_format_problem
from finetune.data.shards import Listing, check_same_shape, is_glob, listing, locate, row_number, shape
from finetune.errors import UserError

#: Plain-text files: each is one document, or one per blank-line block (data.split_on), in format text.
TEXT_SUFFIXES = (".txt", ".md")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", *TEXT_SUFFIXES)
#: Suffixes that make a name a file (missing, or unsupported) rather than a hub dataset id.
PATH_SUFFIXES = DATA_SUFFIXES + (".gz", ".zip", ".xlsx", ".xls", ".arrow")


def unsupported_suffix(path: Path) -> str | None:
    """Why a local file cannot be read, or None when its suffix is one finetune reads."""
    if path.is_dir() or path.suffix.lower() in DATA_SUFFIXES:
        return None
    return (f"unsupported file type `{path.suffix or '(no suffix)'}`; finetune reads {', '.join(DATA_SUFFIXES)} "
            "files, dataset directories and hub dataset ids")


#: What `validate`, `train` and `data` say of a data file without a row (empty, or blank lines only).
NO_ROWS = "no rows (an empty data file)"
#: Bytes read at a time when looking for a file's first non-blank byte: a file with rows answers in the first read.
_PROBE_BYTES = 1 << 16


def empty_file(source: str) -> str | None:
    """Why a local text data file (JSON Lines, JSON, CSV, TSV) has no rows: empty, or only blank lines; None otherwise
    (and for directories, hub names and binary formats, which their readers check). Reads only up to the first
    non-blank byte, so it costs nothing on a file with rows."""
    path = Path(source).expanduser()
    if not path.is_file():
        files = folder_listing(source) if path.is_dir() or is_glob(source) else None
        if files is None or not all(empty_file(str(file)) for file in files.files):
            return None
        return f"{source}: {NO_ROWS} in any of its {len(files.files)} file(s)"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return f"{source}: {NO_ROWS}" if _parquet_rows(path) == 0 else None
    if suffix not in (".jsonl", ".json", ".csv", ".tsv", *TEXT_SUFFIXES):
        return None
    with path.open("rb") as handle:
        while chunk := handle.read(_PROBE_BYTES):
            if chunk.strip(b" \t\r\n\f\v\xef\xbb\xbf"):  # a UTF-8 BOM alone is no row either
                return f"{source}: {NO_ROWS}" if suffix == ".json" and _empty_json(path) else None
    return f"{source}: {NO_ROWS}"


def _parquet_rows(path: Path) -> int | None:
    """Rows a Parquet file's footer declares (None when unreadable: its reader says why)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError):
        return None


def _empty_json(path: Path) -> bool:
    """A .json file that is an empty list (`[]`, `{"data": []}`); only small files are parsed, as an empty list
    cannot be large."""
    if path.stat().st_size > _PROBE_BYTES:
        return False
    try:
        data = json.loads(path.read_text(encoding=text_encoding(path)))
    except (ValueError, UnicodeDecodeError):
        return False
    return data == [] or (isinstance(data, dict) and data.get("data") == [])


def read_records(source: str, split: str, streaming: bool = False,
                 split_on: str = "document") -> Iterator[tuple[int, Any]]:
    """(row number, row) pairs; a row that cannot be parsed comes as the exception, so it is reported, not fatal.
    `streaming`: hub datasets are read as they download (`load_dataset(streaming=True)`), never stored whole.
    `split_on`: how a plain-text file divides into documents (data.split_on)."""
    path = Path(source).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        yield from enumerate(_load_saved(path, split, source), start=1)
    elif (files := folder_listing(source, split)) is not None:
        yield from _shard_rows(files, lambda file: read_file(file, str(file), split_on))
    elif path.exists():
        problem = unsupported_suffix(path)
        if problem:
            raise UserError(f"{source}: {problem}")
        yield from read_file(path, source, split_on)
    elif source.startswith(("/", "./", "../", "~")) or source.lower().endswith(PATH_SUFFIXES):
        raise UserError(f"{source}: data file not found (relative paths are taken from the current directory)")
    else:
        yield from enumerate(_load_dataset(source, split, f"hub dataset `{source}`", streaming), start=1)


def folder_listing(source: str, split: str | None = None) -> Listing | None:
    """The data files of a folder (not a `save_to_disk` one) or glob source, of `split` (None: all of them); None
    for a file, a saved dataset or a hub id."""
    path = Path(source).expanduser()
    if path.is_dir() and is_saved_dataset(path):
        return None
    return listing(source, split, DATA_SUFFIXES)


def local_bytes(source: str) -> int | None:
    """The bytes of a local file, folder or glob source's data files; None for a hub id or a saved dataset."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.stat().st_size
    files = folder_listing(source) if path.is_dir() or is_glob(source) else None
    return sum(file.stat().st_size for file in files.files) if files else None


def row_origin(source: str, row: int) -> tuple[str, int]:
    """The file and its row for a row number of any source: a folder's rows are named by the file they are in."""
    return locate(source, row, DATA_SUFFIXES)


def row_name(source: str, row: int) -> str:
    """`file:row` for a row number of any source (see row_origin)."""
    file, local = row_origin(source, row)
    return f"{file}:{local}"


def _shard_rows(files: Listing, read) -> Iterator[tuple[int, Any]]:
    """The rows of each file of a folder or glob in turn, numbered to name their file, each file's first object row
    checked against the first file's shape; an empty file gives no rows (it loses none)."""
    index = {file: number for number, file in enumerate(files.files)}
    first = None
    for file in files.chosen:
        if file.suffix.lower() not in TEXT_SUFFIXES and empty_file(str(file)):
            continue  # an empty text file is an empty document, which its preparation counts
        checked = False
        for number, value in read(file):
            record = (_parsed(value) if isinstance(value, str) else value) if not checked else None
            if isinstance(record, dict):  # the first row that parses to an object speaks for its file
                first = first or (file, shape(record))
                check_same_shape(files.source, first, file, shape(record))
                checked = True
            yield row_number(index[file], number), value


def _parsed(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def text_encoding(path: Path) -> str:
    """The codec of a text file: utf-8-sig, utf-16 or utf-32 from a byte-order mark (Windows editors save "Unicode"
    text as UTF-16 with one), UTF-16/32 without one from the NUL bytes around its first ASCII character (JSON's own
    rule, RFC 4627), else utf-8. UTF-8 text has no NUL bytes, so it is never mistaken."""
    with path.open("rb") as handle:
        return json.detect_encoding(handle.read(4))


def _jsonl(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    """One row per non-blank line. UTF-8 (with or without a BOM) is decoded line by line, so bytes that are not UTF-8
    cost their row only; UTF-16/UTF-32 files are decoded as a whole."""
    encoding = text_encoding(path)
    if encoding.startswith("utf-8"):
        for number, line in _utf8_lines(path):
            if isinstance(line, Exception):
                yield number, line
                continue
            try:
                yield number, json.loads(line)
            except ValueError as err:
                yield number, err
        return
    try:
        with path.open(encoding=encoding) as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except ValueError as err:
                        yield number, err
    except UnicodeDecodeError as err:
        raise UserError(f"{source}: not valid {encoding.upper()} text ({err.reason}); save it as UTF-8") from None


def text_rows(source: str, split: str, split_on: str = "document") -> Iterator[tuple[int, Any]]:
    """Every row of a source for preparation that parses rows in worker processes: the non-blank lines of UTF-8 JSON
    Lines files unparsed (str; a line that is not UTF-8 comes as its error), other rows as read_records gives them."""
    files = folder_listing(source, split)
    if files is not None:
        return _shard_rows(files, lambda file: _utf8_lines(file) if _is_utf8_jsonl(file) else
                           read_file(file, str(file), split_on))
    path = Path(source).expanduser()
    return _utf8_lines(path) if path.is_file() and _is_utf8_jsonl(path) else \
        read_records(source, split, split_on=split_on)


def _is_utf8_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl" and text_encoding(path).startswith("utf-8")


def _utf8_lines(path: Path) -> Iterator[tuple[int, str | Exception]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield number, err
                continue
            if line.strip():
                yield number, line


def _json(path: Path, source: str) -> Iterator[tuple[int, Any]]:
    encoding = text_encoding(path)
    try:
        data = json.loads(path.read_text(encoding=encoding))
    except UnicodeDecodeError as err:
        raise UserError(f"{source}: not {encoding.upper().removesuffix('-SIG')} text ({err.reason} at byte "
                        f"{err.start})") from None
    except json.JSONDecodeError as err:
        # A JSON value followed by more on a later line is JSON Lines under the wrong name.
        hint = (" The file looks like JSON Lines (one row per line): rename it to .jsonl."
                if err.msg == "Extra data" and err.lineno > 1 else "")
        raise UserError(f"{source}: not valid JSON (line {err.lineno}): {err.msg}.{hint}") from None
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
    encoding = text_encoding(path)
    try:
        with path.open(encoding=encoding, newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, None)
            has_rows = any(any(cell.strip() for cell in row) for row in reader)
    except UnicodeDecodeError as err:
        raise UserError(f"{source}: not {encoding.upper().removesuffix('-SIG')} text ({err.reason} at byte "
                        f"{err.start})") from None
    except csv.Error as err:
        raise UserError(f"{source}: could not read it as {path.suffix.lower()[1:].upper()}: {err}") from None
    if not header:
        raise UserError(f"{source}: empty file (no header row)")
    problem = flat_format_problem(header)
    if problem:
        raise UserError(f"{source}: {problem}")
    if not has_rows:
        raise UserError(f"{source}: no rows (only the header line)")
    import datasets

    features = datasets.Features({name: datasets.Value("string") for name in header})
    try:
        rows = datasets.load_dataset("csv", data_files=str(path), split="train", delimiter=delimiter,
                                     features=features, keep_default_na=False, encoding=encoding)
    except Exception as err:  # ragged rows, duplicate columns: pandas' and arrow's own words name them
        raise UserError(f"{source}: could not read it as {path.suffix.lower()[1:].upper()}: {_root_cause(err)}") \
            from None
    yield from enumerate(rows, start=1)


def _root_cause(err: BaseException) -> str:
    """The innermost error's words: `datasets` wraps pandas' ("Expected 2 fields in line 3, saw 3") in its own
    "An error occurred while generating the dataset"."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    return str(err).strip() or type(err).__name__


def _plain_text(path: Path, source: str, split_on: str) -> Iterator[tuple[int, Any]]:
    """A .txt/.md file as text rows: the whole file as one document (row 1); with split_on blank_line one document
    per block of lines between blank lines, numbered by its first line (so `file:row` is where it starts); with
    `line` one per non-blank line, numbered by its line. Decoded
    as the JSON readers decode (UTF-8 with or without a BOM, UTF-16/32), line ends normalised to \\n."""
    encoding = text_encoding(path)
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise UserError(f"{source}: not {encoding.upper().removesuffix('-SIG')} text ({err.reason} at byte "
                        f"{err.start}); save it as UTF-8") from None
    if split_on == "line":
        yield from ((number, {"text": line.rstrip()}) for number, line in enumerate(text.split("\n"), start=1)
                    if line.strip())
        return
    if split_on != "blank_line":
        yield 1, {"text": text.strip("\n").rstrip()}
        return
    block, first = [], 0
    for number, line in enumerate([*text.split("\n"), ""], start=1):
        if line.strip():
            block.append(line.rstrip())
            first = first or number
        elif block:
            yield first, {"text": "\n".join(block)}
            block, first = [], 0


READERS = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet, ".csv": _delimited, ".tsv": _delimited}


def read_file(path: Path, source: str, split_on: str = "document") -> Iterator[tuple[int, Any]]:
    """The rows of one local data file, read by its suffix."""
    if path.suffix.lower() in TEXT_SUFFIXES:
        return _plain_text(path, source, split_on)
    return READERS[path.suffix.lower()](path, source)


def _load_dataset(name: str, split: str, what: str, streaming: bool = False):
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as err:  # network, missing split, missing dataset: all the user's to fix
        local = "" if what.startswith("dataset directory") else " Offline? Point data.train/data.eval at a local file."
        raise UserError(f"could not load {what} split `{split}`: {err}.{local}") from None


#: Files `datasets`' `save_to_disk` writes: dataset_dict.json for a DatasetDict, state.json and dataset_info.json
#: for one Dataset.
SAVED_MARKERS = ("dataset_dict.json", "state.json")


def is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in SAVED_MARKERS)


def _load_saved(path: Path, split: str, source: str):
    """A `save_to_disk` directory, read with `load_from_disk`: a DatasetDict's `split`, or the one Dataset."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # a partial copy, a newer `datasets` format
        raise UserError(f"{source}: could not read this `save_to_disk` directory with `datasets.load_from_disk`: "
                        f"{_root_cause(err)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{source}: no split `{split}` in this saved dataset (it has "
                            f"{', '.join(loaded) or 'none'}); set data.train_split / data.eval_split")
        return loaded[split]
    return loaded
