"""Optional dependencies, probed in one place: whether a package is importable, without importing it (several
import torch or CUDA libraries, which `finetune validate` must not pay for), and how to install it."""

from __future__ import annotations

import importlib.util

#: The pip requirement that brings each optional package (an extra of finetune's where there is one).
INSTALL = {
    "flash_attn": "pip install 'finetune[gpu]' (CUDA machines only)",
    "deepspeed": "pip install 'finetune[deepspeed]' (CUDA machines only)",
    "llama_cpp": "pip install 'finetune[llamacpp]' (needs a C++ compiler and cmake)",
    "tensorboard": "pip install tensorboard",
    "wandb": "pip install wandb",
    "mlflow": "pip install mlflow",
    "trackio": "pip install trackio",
    "vllm": "pip install 'finetune[vllm]' (CUDA machines only)",
    "lm_eval": "pip install 'finetune[bench]'",
}


def installed(module: str) -> bool:
    """Whether `module` can be imported here (found on the path; not imported)."""
    return importlib.util.find_spec(module) is not None


def missing(modules) -> list[str]:
    """The modules of `modules` that are not installed, in order."""
    return [name for name in modules if not installed(name)]
