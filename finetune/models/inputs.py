"""What a path argument is, read from its content rather than its name: every command that takes a model, a run or a
GGUF file asks `identify` and refuses a mismatch with one message saying what the path is and what to do.

Names lie (a GGUF saved as model.bin, a run whose held_out.jsonl was removed); the first bytes of a file and the
marker files of a directory do not."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.data.sources import DATA_SUFFIXES
from finetune.errors import UserError
from finetune.models.registry import EMBEDDED
from finetune.models.weights import ADAPTER_WEIGHTS, MODEL_WEIGHTS, looks_local
from finetune.paths import PARTIAL_MARKER, RUN_INFO

GGUF, SAFETENSORS, PICKLE, DATA_FILE, FILE = "gguf", "safetensors", "pickle", "data file", "file"
MARKER_FILE = "marker file"
MODEL_DIR, WEIGHTS_DIR, ADAPTER_DIR = "model dir", "weights dir", "adapter dir"
RUN_DIR, GGUF_DIR = "run dir", "gguf dir"
PARTIAL, EMPTY_DIR, DATA_DIR, DIRECTORY = "partial", "empty dir", "data dir", "directory"
MISSING, ALIAS, HUB = "missing", "alias", "hub id"
#: What a user would pass as a model: these load (a GGUF is converted once, see finetune.models.load).
MODEL_KINDS = (MODEL_DIR, GGUF, GGUF_DIR, ALIAS, HUB)

#: Suffixes of data files: those finetune reads rows from, and `datasets`' own Arrow files.
_DATA_SUFFIXES = (*DATA_SUFFIXES, ".arrow")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Input:
    """A path argument and what it is; `files` are the files that matter (the GGUF inside a folder, the weights of a
    directory without config.json) and `command` the one a partial output names."""

    given: str
    kind: str
    files: tuple[Path, ...] = ()
    command: str = ""

    @property
    def path(self) -> Path:
        return Path(self.given).expanduser()

    def describe(self) -> str:
        names = ", ".join(f.name for f in self.files[:4])
        return {
            GGUF: "a GGUF file", SAFETENSORS: "a safetensors weights file",
            PICKLE: "a PyTorch (pickle) checkpoint file", DATA_FILE: "a data file",
            FILE: "a file finetune does not read", MARKER_FILE: "the marker file of a model, adapter or run directory",
            MODEL_DIR: "a model directory", WEIGHTS_DIR: f"a directory with model weights ({names}) but no config.json",
            ADAPTER_DIR: "a LoRA adapter directory", RUN_DIR: "a finetune run directory",
            GGUF_DIR: f"a directory holding only {'GGUF files' if len(self.files) > 1 else 'a GGUF file'} ({names})",
            PARTIAL: f"an incomplete output of `{self.command}` (it was interrupted before it finished)",
            EMPTY_DIR: "an empty directory", DATA_DIR: "a saved dataset directory",
            DIRECTORY: "a directory without config.json, run.json or adapter_config.json" + (f" ({names})" if names
                                                                                             else ""),
            MISSING: "not found", ALIAS: "the embedded model alias", HUB: "a Hugging Face hub id (not a local path)",
        }[self.kind]


def identify(given: str | Path) -> Input:
    """What `given` is: a file by its first bytes, a directory by its marker files, else an alias, a hub id or a
    missing path."""
    given = str(given)
    path = Path(given).expanduser()
    if path.is_dir():
        return _directory(given, path)
    if path.is_file():
        # A file inside a killed command's temporary (a GGUF an export was still writing) is as partial as it is.
        if (path.parent / PARTIAL_MARKER).is_file() and path.name != PARTIAL_MARKER:
            return Input(given, PARTIAL, command=_partial_command(path.parent / PARTIAL_MARKER))
        return Input(given, _file_kind(path))
    if given in EMBEDDED:
        return Input(given, ALIAS)
    return Input(given, MISSING if is_path_like(given) else HUB)


def is_path_like(name: str) -> bool:
    """A name that can only mean a local path (so `not found` is the answer), not a hub id."""
    return looks_local(name) or name.startswith("/") or Path(name).suffix.lower() in (*_DATA_SUFFIXES, ".gguf",
                                                                                        ".safetensors", ".bin")


def _file_kind(path: Path) -> str:
    if path.name in ("config.json", "adapter_config.json", RUN_INFO, PARTIAL_MARKER):
        return MARKER_FILE  # JSON, but a directory's, not rows
    with path.open("rb") as handle:
        head = handle.read(16)
    if head[:4] == b"GGUF":
        return GGUF
    size = path.stat().st_size
    if len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return SAFETENSORS
    if head[:4] == b"PK\x03\x04" and path.suffix.lower() not in (*_DATA_SUFFIXES, ".zip") or head[:1] == b"\x80":
        return PICKLE  # torch.save writes a zip archive (>= 1.6) or a bare pickle (protocol 2+ starts with 0x80)
    if path.suffix.lower() in _DATA_SUFFIXES or head[:4] == b"PAR1" or head.lstrip()[:1] in (b"{", b"["):
        return DATA_FILE
    return FILE


def _directory(given: str, path: Path) -> Input:
    # The partial marker first: a killed merge leaves config.json and weights beside it, which look complete.
    if (path / PARTIAL_MARKER).is_file():
        return Input(given, PARTIAL, command=_partial_command(path / PARTIAL_MARKER))
    for marker, kind in ((RUN_INFO, RUN_DIR), ("adapter_config.json", ADAPTER_DIR), ("config.json", MODEL_DIR),
                         ("dataset_dict.json", DATA_DIR), ("state.json", DATA_DIR)):
        if (path / marker).is_file():
            return Input(given, kind)
    entries = sorted(e for e in path.iterdir() if not e.name.startswith("."))
    if not entries:
        return Input(given, EMPTY_DIR)
    files = [e for e in entries if e.is_file()]
    ggufs = [f for f in files if _file_kind(f) == GGUF]
    if ggufs and all(f in ggufs or f.suffix in (".md", ".txt") for f in files):  # a download: a README may come too
        return Input(given, GGUF_DIR, tuple(ggufs))
    weights = [f for f in files if f.name in (*(n for pair in MODEL_WEIGHTS for n in pair), *ADAPTER_WEIGHTS)
               or f.suffix == ".safetensors"]
    if weights:
        return Input(given, WEIGHTS_DIR, tuple(weights))
    return Input(given, DIRECTORY, tuple(entries))


def _partial_command(marker: Path) -> str:
    try:
        value = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        value = None
    return str(value.get("command") or "") if isinstance(value, dict) else ""


def tokenizer_missing(directory: Path) -> bool:
    """A model directory whose tokenizer files are gone: transformers would then fall back to a slow tokenizer class
    and blame sentencepiece."""
    return not any((directory / name).is_file() for name in TOKENIZER_FILES)


#: What the commands that take a model accept, as their messages say it.
AS_MODEL = f"a model directory (config.json), a GGUF file, a hub id or the alias `{next(iter(EMBEDDED))}`"
AS_TARGET = f"a finished run directory (run.json) or {AS_MODEL}"


def expect(given: str | Path, kinds: tuple[str, ...], role: str, expected: str) -> Input:
    """`given` identified, or one UserError when it is none of `kinds`."""
    item = identify(given)
    if item.kind not in kinds:
        raise refusal(item, role, expected)
    return item


def refusal(item: Input, role: str, expected: str) -> UserError:
    """One message: what the path is, what `role` takes, and what to do with what was given."""
    advice = _advice(item)
    return UserError(f"{item.given}: {item.describe()}, but {role} takes {expected}." + (f" {advice}" if advice
                                                                                            else ""))


def _advice(item: Input) -> str:
    path = item.path
    if item.kind == GGUF_DIR and len(item.files) > 1:
        return f"Name one of the files: {', '.join(str(f) for f in item.files)}."
    if item.kind in (GGUF, GGUF_DIR):
        file = item.files[0] if item.kind == GGUF_DIR else path
        return (f"`finetune import-gguf {file} --output DIR` converts it to a trainable model directory; as a model "
                "(model.name_or_path, or the target of chat, eval and export) it is converted by itself.")
    if item.kind == MARKER_FILE:
        return f"Name the directory that holds it: {path.parent}."
    if item.kind in (SAFETENSORS, PICKLE):
        return f"Name the model directory that holds it with its config.json and tokenizer (perhaps {path.parent})."
    if item.kind == WEIGHTS_DIR:
        return ("Without config.json the model cannot be built: copy the directory again from its source, or restore "
                "config.json.")
    if item.kind == ADAPTER_DIR:
        run = path.parent if (path.parent / RUN_INFO).is_file() else None
        return f"Name its run directory, {run}, which knows its base model." if run else \
            "finetune reads an adapter through the run directory it was trained in (run.json names its base model)."
    if item.kind == RUN_DIR:
        return (f"Its weights are in {path / 'model'} (a full run) or {path / 'adapter'} (a LoRA run: `finetune "
                f"merge {path} --output DIR` makes a model directory of it).")
    if item.kind == PARTIAL:
        again = f": {item.command}" if item.command else ""
        return f"Nothing in it is usable; remove it and run the command again{again}."
    if item.kind in (DATA_FILE, DATA_DIR):
        return "Data goes in the recipe's data.train or data.eval (or `finetune eval --data`)."
    if item.kind == MISSING:
        return "Relative paths are taken from the current directory."
    return ""


def gguf_file(item: Input, role: str, expected: str) -> Path:
    """The GGUF file a GGUF file or GGUF folder names.

    A folder holding exactly one GGUF (a download, perhaps with its README) can only mean that file, so it is used
    as the file; one holding several (a model's quantisations) is refused with their names, since choosing one for
    the user would train or convert a different model than the one they think."""
    if item.kind == GGUF_DIR and len(item.files) > 1:
        raise refusal(item, role, expected)
    return item.files[0] if item.kind == GGUF_DIR else item.path
