"""Prepared data on disk: a key from everything that decides the token ids, a lock so that one process prepares
while the others (DDP ranks, a second run) wait, and the prepared Arrow datasets memory-mapped back.

The key covers the data files' bytes, the tokenizer (vocabulary, added tokens), the chat template(s), the format
options, max_length, the held-out split and finetune's own data code, so a changed row, template or max_length
prepares again and nothing else does. Hub datasets have no content to hash before they are downloaded and may change
under the same id: they are prepared every time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
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
    """The content digest of a local file or directory (every file under it, by relative path), None for a hub id
    (not cacheable) and "" for no source."""
    if source is None:
        return ""
    path = Path(source).expanduser()
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        digest = hashlib.sha1()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path)}\0{file_digest(file)}\0".encode())
        return digest.hexdigest()
    return None


def tokenizer_digest(tokenizer, template) -> str:
    digest = hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode())
    for part in (template.text, template.tool_text or "", template.end_of_turn, str(template.fold_system),
                 json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


def _code_digest() -> str:
    digest = hashlib.sha1(str(LAYOUT).encode())
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(file.read_bytes())
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


def is_complete(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


def write_complete(directory: Path, build) -> None:
    """Run `build(tmp_dir)` and move the result into place; a failure leaves no half-written entry."""
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Which process prepared the entry, and when: a second line means it was prepared again (a deleted entry, or
    # processes that did not share the lock).
    with open(directory.with_name(directory.name + ".prepared"), "a") as record:
        record.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} rank {os.environ.get('RANK', '-')}\n")
