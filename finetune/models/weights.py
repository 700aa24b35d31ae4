"""Weight files checked before a library loads them: a missing, truncated or code-running file gets one message
naming it instead of a library traceback, and no pickle payload is ever run to find out."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from finetune.errors import UserError

#: What transformers loads from a model directory, in its order of preference: a single file or a shard index.
MODEL_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),
                 ("pytorch_model.bin", "pytorch_model.bin.index.json"))
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_RESTORE = "Restore it from a good copy, or write it again (a run's weights: train again)."
_PICKLE_ADVICE = ("finetune loads weights without running code; use safetensors weights from a source you trust "
                  "(or convert a copy you trust yourself)")


def looks_local(name_or_path: str) -> bool:
    """A filesystem path rather than a hub id (`org/name`), so `not found` is the answer, not a hub lookup."""
    return Path(name_or_path).is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1


def check_model_dir(path: str | Path) -> None:
    """Refuse a model directory transformers could not load: no config, no weights, a missing shard, a truncated
    safetensors file, a pickle that would run code. Hub ids pass (transformers resolves them)."""
    directory = Path(path).expanduser()
    if not directory.exists():
        if looks_local(str(path)):
            raise UserError(f"{path}: model directory not found")
        return
    if not directory.is_dir():
        raise UserError(f"{path}: not a model directory (a file); point at the directory holding config.json")
    _check_json(directory / "config.json", "the model's configuration")
    for single, index in MODEL_WEIGHTS:
        if (directory / single).is_file():
            return check_weight_file(directory / single)
        if (directory / index).is_file():
            for shard in _shards(directory / index):
                check_weight_file(shard)
            return
    raise UserError(f"{directory}: no weights file (model.safetensors, pytorch_model.bin or a sharded index); the "
                    f"model directory is incomplete. {_RESTORE}")


def check_adapter_dir(path: Path) -> None:
    """Refuse a peft adapter directory peft could not load (missing or damaged config or weights)."""
    if not path.is_dir():
        raise UserError(f"{path}: LoRA adapter directory not found. {_RESTORE}")
    config = _check_json(path / "adapter_config.json", "the adapter's rank, alpha and target modules")
    if "peft_type" not in config:
        raise UserError(f"{path / 'adapter_config.json'}: not a peft adapter configuration (no `peft_type`). "
                        f"{_RESTORE}")
    weights = [path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()]
    if not weights:
        raise UserError(f"{path / ADAPTER_WEIGHTS[0]}: missing, so the LoRA adapter has no weights. {_RESTORE}")
    check_weight_file(weights[0])  # the one peft loads


def check_weight_file(file: Path) -> None:
    if not file.is_file():
        raise UserError(f"{file}: weights file missing. {_RESTORE}")
    if file.suffix == ".safetensors":
        _check_safetensors(file)
    else:
        _check_pickle(file)


def _check_json(file: Path, holds: str) -> dict:
    if not file.is_file():
        raise UserError(f"{file}: missing; it holds {holds}, without which nothing loads. {_RESTORE}")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file}: damaged (not valid JSON: {err}). {_RESTORE}") from None
    if not isinstance(value, dict):
        raise UserError(f"{file}: damaged (expected a JSON object). {_RESTORE}")
    return value


def _shards(index: Path) -> list[Path]:
    weight_map = _check_json(index, "the list of weight shards").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index}: damaged (no `weight_map`). {_RESTORE}")
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def _check_safetensors(file: Path) -> None:
    """The header (8-byte length, JSON) must be readable and the tensors it lists must end where the file ends.

    safetensors checks the same but says only "incomplete metadata"; sizes tell the user the file was cut short."""
    from safetensors import SafetensorError, safe_open

    size = file.stat().st_size
    with file.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little") if size >= 8 else 0
        readable = 8 <= 8 + length <= size and length <= 100_000_000  # safetensors' own header size limit
        try:
            header = json.loads(handle.read(length)) if readable and length else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise UserError(f"{file}: truncated or not a safetensors file ({size:,} bytes, no readable header). "
                        f"{_RESTORE}")
    ends = [t.get("data_offsets", [0, 0])[1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        raise UserError(f"{file}: truncated: {size:,} bytes where its header describes {expected:,} (an interrupted "
                        f"copy or save, or a full disk). {_RESTORE}")
    if size > expected:
        raise UserError(f"{file}: damaged: {size:,} bytes where its header describes {expected:,}. {_RESTORE}")
    try:
        with safe_open(str(file), "pt"):
            pass
    except SafetensorError as err:
        raise UserError(f"{file}: damaged safetensors file ({err}). {_RESTORE}") from None


def _check_pickle(file: Path) -> None:
    """Refuse a pickle checkpoint that holds more than tensors, without running any of it.

    A torch.save zip archive is scanned statically (torch lists the globals it would call) against torch's
    weights-only allowlist. A legacy (pre-zip) file cannot be scanned, so it is loaded once with the weights-only
    unpickler, which only builds tensors and containers: the same load transformers does, done here so that a
    damaged file is named. Legacy files are rare (torch < 1.6) and the extra read is the price of the message."""
    import torch

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except ValueError:  # not a torch.save zip archive
        unsafe = None
    except RuntimeError:  # a zip archive torch cannot read: truncated or damaged
        raise UserError(f"{file}: truncated or damaged torch checkpoint (not a readable zip archive). {_RESTORE}") \
            from None
    if unsafe:
        raise UserError(f"{file}: refused: this pickle checkpoint would run code when loaded (it names "
                        f"{', '.join(sorted(unsafe))}), not just read weights. {_PICKLE_ADVICE}.")
    if unsafe is None:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's note on the pickle protocol: noise before our message
                torch.load(str(file), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise UserError(pickle_refused(file, err)) from None
        except Exception as err:  # EOF, bad opcodes, garbage: torch raises many types for a file it cannot read
            raise UserError(f"{file}: not a readable torch checkpoint ({type(err).__name__}: {_first_line(err)}). "
                            f"{_RESTORE}") from None


def pickle_refused(where, err: Exception) -> str:
    """torch's refusal says what it met but also suggests `weights_only=False`: keep only the former."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    detail = text[text.index(marker) + len(marker):].strip().splitlines()[0] if marker in text else ""
    return (f"{where}: refused: this pickle checkpoint holds more than tensors{f' ({detail})' if detail else ''}, "
            f"and loading it could run code. {_PICKLE_ADVICE}.")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
