"""Prepared data on disk: a key from everything that decides the token ids, a lock so that one process prepares
while the others (DDP ranks, a second run) wait, and the prepared Arrow datasets memory-mapped back.

An entry is complete when its manifest (every file's size, and a hash of the small ones) is there: it is written
last, and checked before each use, so an entry damaged on disk (truncated, a file lost or edited) is named and
prepared again instead of failing deep inside `datasets`. Nothing is written into a complete entry: the trainers'
own `map` caches go to a temporary folder removed at exit (see `read_only_entries`).

The key covers the data files' bytes, the tokenizer (vocabulary, added tokens), the chat template(s), the format
options, max_length, the held-out split and finetune's own data code, so a changed row, template or max_length
prepares again and nothing else does. Hub datasets have no content to hash before they are downloaded and may change
under the same id: they are prepared every time.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Bump when prepared datasets change shape; the data package's own source is part of the key too.
LAYOUT = 1
_CHUNK = 1 << 23


def cache_root() -> Path:
    from finetune.paths import cache_dir

    return cache_dir() / "data"


def file_digest(path: Path) -> str:
    """sha1 of a file's bytes (the key needs change detection, not security; sha1 is OpenSSL's fastest here)."""
    digest = hashlib.sha1()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_digest(source: str | None) -> str | None:
    """The content digest of a local file, or of a folder's or glob's data files (by name), None for a hub id (not
    cacheable) and "" for no source. A folder's card or hidden files do not count: they are not read."""
    from finetune.data.sources import folder_listing

    if source is None:
        return ""
    path = Path(source).expanduser()
    if path.is_file():
        return file_digest(path)
    files = folder_listing(source)
    if files is not None or path.is_dir():  # a saved dataset: every file under it
        names = files.files if files is not None else sorted(p for p in path.rglob("*") if p.is_file())
        digest = hashlib.sha1()
        for file in names:
            digest.update(f"{file.relative_to(path) if path.is_dir() else file}\0{file_digest(file)}\0".encode())
        return digest.hexdigest()
    return None


def tokenizer_digest(tokenizer, template) -> str:
    """The tokenizer and the ChatTemplate it renders with (None: a processor's template, in the key's options)."""
    digest = hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode())
    parts = (template.text, template.tool_text or "", template.end_of_turn, str(template.fold_system)) \
        if template is not None else ()
    for part in (*parts, json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


def _code_digest() -> str:
    digest = hashlib.sha1(str(LAYOUT).encode())
    package = Path(__file__).parent
    for file in sorted(package.rglob("*.py")):  # the preference readers too
        digest.update(str(file.relative_to(package)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def cache_key(tokenizer, template, sources: dict[str, str | None], options: dict) -> str | None:
    """The key of a preparation, or None when a source cannot be fingerprinted (hub ids)."""
    digests = {name: source_digest(source) for name, source in sources.items()}
    if any(value is None for value in digests.values()):
        return None
    material = {"sources": digests, "options": options, "tokenizer": tokenizer_digest(tokenizer, template),
                "code": _code_digest()}
    return hashlib.sha1(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


@contextmanager
def claimed(key: str) -> Iterator[Path]:
    """The key's directory, held under an exclusive lock: whoever comes first prepares it, the others block until it
    is complete and then read it. The kernel drops the lock of a process that dies."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield root / key
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


#: The file that marks an entry complete and lists what it holds (written last).
MANIFEST = "manifest.json"
#: Files up to this size are hashed in the manifest (metadata, held-out rows); larger ones (Arrow data) are checked by
#: size, which a truncation or a lost write changes, so checking costs milliseconds whatever the entry's size.
_HASHED_BYTES = 1 << 20


def _contents(directory: Path) -> dict[str, list]:
    """Each file of the entry: [size, sha1 of its bytes or None when larger than _HASHED_BYTES]."""
    out = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = file.stat().st_size
        out[str(file.relative_to(directory))] = [size, file_digest(file) if size <= _HASHED_BYTES else None]
    return out


def entry_problem(directory: Path) -> str | None:
    """Why a cache entry cannot be used ("absent" when there is none), or None when its files match its manifest.
    Files beyond the manifest (a `datasets` cache from an older finetune) are left alone."""
    if not directory.exists():
        return "absent"
    try:
        listed = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST} (written last, so the preparation did not finish)"
    for name, (size, digest) in listed.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if digest is not None and file_digest(file) != digest:
            return f"{name} was changed after it was written"
    return None


def write_complete(directory: Path, build) -> None:
    """Run `build(tmp_dir)`, list what it wrote in the manifest and move the result into place; a failure leaves no
    half-written entry."""
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"files": _contents(tmp)}, indent=1) + "\n")
        if directory.is_symlink() or directory.is_file():  # something else under the entry's name
            directory.unlink()
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Which process prepared the entry, and when: a second line means it was prepared again (a deleted or damaged
    # entry, or processes that did not share the lock).
    try:
        with open(directory.with_name(directory.name + ".prepared"), "a") as record:
            record.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} rank "
                         f"{os.environ.get('RANK', '-')}\n")
    except OSError:  # a diagnostic record only: the entry itself is complete
        pass


def prepared(key: str | None, build, load, log, prefix: str = "finetune-data-"):
    """(what `load(directory)` makes of the entry, the directory, whether it was read from the cache). The entry is
    checked against its manifest and prepared again, with one line, when damaged; a load that fails on an entry the
    manifest passed (bytes changed inside a large Arrow file, which only sizes cover) is taken as damage too. `key`
    None (a hub dataset, or the cache off): a temporary entry, removed at exit."""
    from finetune.errors import UserError

    try:
        return _prepared(key, build, load, log, prefix)
    except OSError as err:  # the cache's own paths: a file where a folder should be, no room, no permission
        where = err.filename or cache_root()
        raise UserError(f"the prepared-data cache could not be used: {err.strerror or err} ({where}). Fix or remove "
                        f"that path (the cache is {cache_root()}, set by $FINETUNE_CACHE), or set data.cache: "
                        "false") from None


def _prepared(key: str | None, build, load, log, prefix: str):
    """`prepared` without its error translation."""
    if key is None:
        directory = Path(tempfile.mkdtemp(prefix=prefix))
        atexit.register(shutil.rmtree, directory, True)
        build(directory)
        return load(directory), directory, False
    with claimed(key) as directory:
        problem = entry_problem(directory)
        if problem is None:
            try:
                return load(directory), directory, True
            except (OSError, ValueError, KeyError, TypeError) as err:  # pyarrow's ArrowInvalid is a ValueError
                problem = f"{type(err).__name__}: {err}"
        if problem != "absent":
            log(f"data: the cache entry {directory} is damaged ({problem}); preparing it again")
        _remove_unfinished(directory, log)
        write_complete(directory, build)
        return load(directory), directory, False


def check_token_ids(dataset, vocabulary: int, name: str) -> None:
    """Raise ValueError when a column of token ids holds one outside the vocabulary (-100 marks no loss): the sign of
    bytes changed inside an Arrow file whose size the manifest still matches. One pass of Arrow compute per column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for column in dataset.column_names:
        values = dataset.data.column(column)
        if not (pa.types.is_list(values.type) and pa.types.is_integer(values.type.value_type)):
            continue
        bounds = pc.min_max(pc.list_flatten(values)).as_py()
        low, high = bounds["min"], bounds["max"]
        if low is not None and (low < -100 or high >= vocabulary):
            raise ValueError(f"{name}/ holds token id {high if high >= vocabulary else low} in `{column}`, outside "
                             f"the tokenizer's {vocabulary} ids")


def _remove_unfinished(directory: Path, log) -> None:
    """Remove what killed preparations of this entry left (`<key>.tmp<pid>`): under the entry's lock no live process
    of finetune is writing one."""
    from finetune.paths import remove_leftover

    for left in sorted(directory.parent.glob(directory.name + ".tmp*")):
        remove_leftover(left, "the unfinished preparation of an interrupted run", log)


@contextmanager
def read_only_entries():
    """While a trainer runs: `datasets` writes the results of the trainers' own `map` calls into a temporary folder
    (removed at exit) instead of beside the prepared Arrow files, so that a complete entry shared by several runs
    never changes under them."""
    import datasets

    was_on = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_caching()
