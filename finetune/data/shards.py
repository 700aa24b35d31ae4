"""A folder or a glob as one source: the data files it names, read in order, and where each row came from.

`datasets`' folder loading reads one file type and, when some file names carry a split word, only those files:
shards disappear with no message. Here a folder gives every data file in it (every supported type, every name), or
is refused with the list of what would be left out and why. Split words are honoured only when every data file has
one (`train.jsonl` beside `test.jsonl`); a folder that mixes named and unnamed files is refused. A glob
(`dir/*.jsonl`, `dir/**/*.parquet`) gives exactly the files it matches.

Rows of a multi-file source are numbered `(file index + 1) * STRIDE + row in the file`, so that one integer still
names a row and `row_name` gives it back as `file:row`.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from finetune.errors import UserError

#: Rows a file may hold before its numbers run into the next file's (int64 leaves room for 9e8 files).
STRIDE = 10**10
#: Names `datasets` and the hub give each split (datasets.data_files' keywords); a file's first path word among
#: them names its split.
SPLIT_WORDS = {"train": "train", "training": "train", "test": "test", "testing": "test", "eval": "test",
               "evaluation": "test", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation"}
#: Files a downloaded data-set folder carries beside its data: its card and licence, the hub's metadata.
METADATA = re.compile(r"^(readme|license|licence|copying|notice)(\.\w+)?$|^dataset_infos?\.json$", re.IGNORECASE)
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class Listing:
    """The files of a folder or glob: all data files in order (row numbers index this list), those of the split
    asked for, and what was passed over as not data (hidden files, cards, licences)."""

    source: str
    files: list[Path]
    chosen: list[Path]
    skipped: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What `finetune data` says of the source: the files it reads and those it passed over."""
        names = [self._name(file) for file in self.chosen]
        lines = [f"{self.source}: {len(names)} file{'s' * (len(names) != 1)}: {', '.join(names)}"]
        others = [self._name(file) for file in self.files if file not in self.chosen]
        if others:
            lines.append(f"{self.source}: files of other splits, not read for this one: {', '.join(others)}")
        if self.skipped:
            lines.append(f"{self.source}: not data, not read: {', '.join(self.skipped)}")
        return lines

    def _name(self, file: Path) -> str:
        base = Path(self.source).expanduser()
        return str(file.relative_to(base)) if base.is_dir() else str(file)


def is_glob(source: str) -> bool:
    return bool(_GLOB_CHARS.search(source)) and not Path(source).expanduser().exists()


def listing(source: str, split: str | None, data_suffixes: tuple[str, ...]) -> Listing | None:
    """The files of a folder (not a `save_to_disk` one; the caller tells) or glob; None for any other source.
    `split` None takes every data file; otherwise split words choose (see the module docstring)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files, skipped, unreadable = _sort_out(sorted(p for p in path.rglob("*") if p.is_file()), path, data_suffixes)
    elif is_glob(source):
        matched = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matched:
            raise UserError(f"{source}: the pattern matches no file (relative patterns are taken from the current "
                            "directory)")
        files, skipped, unreadable = _sort_out(matched, None, data_suffixes)
    else:
        return None
    if unreadable:
        raise UserError(f"{source}: holds files finetune cannot read as data, which would be left out: "
                        f"{', '.join(unreadable[:20])}{' ...' if len(unreadable) > 20 else ''}. finetune reads "
                        f"{', '.join(data_suffixes)}; move the others out, or name the data files with a pattern "
                        f"such as {_pattern(source, files)}")
    if not files:
        raise UserError(f"{source}: no data file in this folder (finetune reads {', '.join(data_suffixes)})")
    chosen = files if split is None or not path.is_dir() else _split_files(source, path, files, split)
    return Listing(source, files, chosen, skipped)


def _sort_out(found: list[Path], folder: Path | None, data_suffixes) -> tuple[list[Path], list[str], list[str]]:
    """Files in path order as data files, what is not data (hidden, cards, licences), and what cannot be read."""
    files, skipped, unreadable = [], [], []
    for file in found:
        relative = file.relative_to(folder) if folder else file
        if any(part.startswith(".") for part in relative.parts[-1 if folder is None else 0:]) or \
                METADATA.match(file.name):
            skipped.append(str(relative))  # .git, the hub's .cache, README.md: not rows
        elif file.suffix.lower() in data_suffixes:
            files.append(file)
        else:
            unreadable.append(f"{relative} ({file.suffix or 'no suffix'})")
    return files, skipped, unreadable


def _pattern(source: str, files: list[Path]) -> str:
    """Globs naming a folder's data files, one per file type."""
    patterns = [str(Path(source) / f"*{suffix}") for suffix in sorted({f.suffix.lower() for f in files})]
    if len(patterns) <= 1:
        return patterns[0] if patterns else str(Path(source) / "*.jsonl")
    return f"{', '.join(patterns)} (one `data.sources` entry each)"


def split_of(relative: Path) -> str | None:
    """The split a file's path names by its first split word (`data/train-00000-of-00002.parquet`: train)."""
    for word in re.split(r"[^a-z]+", str(relative).lower()):
        if word in SPLIT_WORDS:
            return SPLIT_WORDS[word]
    return None


def _split_files(source: str, folder: Path, files: list[Path], split: str) -> list[Path]:
    splits = {file: split_of(file.relative_to(folder)) for file in files}
    if not any(splits.values()):
        return files  # no file names a split: the folder is one split, whichever was asked for
    unnamed = [str(f.relative_to(folder)) for f, s in splits.items() if s is None]
    if unnamed:
        named = next(f for f, s in splits.items() if s)
        raise UserError(f"{source}: some files are named for a split ({named.relative_to(folder)}: "
                        f"{splits[named]}) and some are not, so reading the folder by split would leave out "
                        f"{', '.join(unnamed[:20])}{' ...' if len(unnamed) > 20 else ''}. Rename them, or name the "
                        f"files to read with a pattern such as {_pattern(source, files)}")
    wanted = SPLIT_WORDS.get(split.lower(), split.lower())
    chosen = [f for f, s in splits.items() if s == wanted]
    if not chosen:
        have = sorted({s for s in splits.values() if s})
        raise UserError(f"{source}: no file named for split `{split}`; its files name the splits "
                        f"{', '.join(have)}. Set data.train_split / data.eval_split to one of them")
    return chosen


def row_number(file_index: int, row: int) -> int:
    if row >= STRIDE:
        raise UserError(f"a data file with more than {STRIDE} rows cannot be part of a folder source; name it alone")
    return (file_index + 1) * STRIDE + row


def locate(source: str, row: int, data_suffixes: tuple[str, ...]) -> tuple[str, int]:
    """The file and the row in it of a row number of `source` (itself and the number for one-file sources)."""
    if row < STRIDE:
        return source, row
    index, local = divmod(row, STRIDE)
    files = _all_files(source, data_suffixes, _stamp(source))
    if index > len(files):  # the folder changed since the rows were read: say what is known
        return f"{source} (file {index})", local
    return str(files[index - 1]), local


def _stamp(source: str) -> int:
    """When the folder (or a glob's first fixed folder) last changed: a new file in it lists afresh."""
    fixed = Path(source).expanduser()
    while _GLOB_CHARS.search(str(fixed)) and fixed != fixed.parent:
        fixed = fixed.parent
    try:
        return fixed.stat().st_mtime_ns
    except OSError:
        return 0


@lru_cache(maxsize=16)
def _all_files(source: str, data_suffixes: tuple[str, ...], stamp: int) -> tuple[Path, ...]:
    """Every data file of a folder or glob; cached, as every refused row of a folder is named through it."""
    try:
        found = listing(source, None, data_suffixes)
    except UserError:
        found = None
    return tuple(found.files) if found else ()


#: A schema's columns that decide how rows are read; other columns (system, input, tools, ids) may come and go
#: between shards without changing a row's meaning.
SHAPE_COLUMNS = frozenset({"messages", "conversations", "instruction", "output", "prompt", "completion", "chosen",
                           "rejected", "label", "kto_tag", "text"})


def shape(record) -> frozenset[str]:
    """The columns of a row that decide its format (see SHAPE_COLUMNS)."""
    if not isinstance(record, dict):
        return frozenset()
    return frozenset(key for key, value in record.items() if key in SHAPE_COLUMNS and value is not None)


def check_same_shape(source: str, first: tuple[Path, frozenset], file: Path, columns: frozenset) -> None:
    """Refuse shards whose rows differ in the columns that decide the format, naming both files and the columns."""
    if columns == first[1]:
        return
    only_first, only_this = sorted(first[1] - columns), sorted(columns - first[1])
    differ = "; ".join(part for part in (
        f"only {first[0]} has {', '.join(only_first)}" if only_first else "",
        f"only {file} has {', '.join(only_this)}" if only_this else "") if part)
    raise UserError(f"{source}: its files hold rows of different shapes ({differ}), so they cannot be read as one "
                    "source. Convert them to one format, or list them as separate `data.sources` entries")
