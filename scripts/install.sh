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
# Versions from the package metadata: importing peft would import bitsandbytes, whose import prints CPU-kernel notices.
"$PY" -c "from importlib.metadata import version as v; print('install: ' + ', '.join(f'{p} {v(p)}' for p in ('torch', 'transformers', 'trl', 'peft')))"
