"""llama.cpp itself, through llama-cpp-python (built from source by pip; scripts/install.sh installs it where it
builds): the k-quant quantiser (`llama_model_quantize`, what llama-quantize runs) and a runtime that answers the
export check's prompts the way llama.cpp, Ollama and LM Studio will. Optional: without it, `finetune export`
writes f16/bf16/q8_0 and checks through transformers' GGUF reader only.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

#: `--quant` names llama.cpp's quantiser makes here, and its file types (llama.h's llama_ftype).
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def quantize(source: Path, output: Path, quant: str) -> int:
    """`source` (f16) quantised to `output`; returns how many tensors llama.cpp gave another type than the k-quant
    (its blocks are 256 wide: SmolLM2's 576-wide rows fall back to q5_0/q8_0, as llama-quantize does)."""
    import ctypes
    import logging
    import tempfile

    import llama_cpp

    # llama-cpp-python prints llama.cpp's log unless its logger is raised; the quantiser also writes a warning per
    # tensor straight to the process's stderr, so that is caught in a file for the duration and summed up.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[quant])
    params.nthread = os.cpu_count() or 1
    with tempfile.TemporaryFile("w+") as caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            failed = llama_cpp.llama_model_quantize(str(source).encode(), str(output).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read()
    if failed:
        raise RuntimeError(f"llama.cpp could not quantise {source} to {quant}: {text.strip()[-500:]}")
    return sum("falling back" in line for line in text.splitlines())


def greedy_answers(gguf_path: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Each prompt's greedy continuation in llama.cpp, up to an end-of-generation token (the GGUF's EOS and the
    tokens llama.cpp itself counts as ending a turn). Prompts are tokenized as the trained model's are: special
    tokens parsed, no BOS added beyond what the template wrote."""
    import llama_cpp

    longest = max((len(p) for p in prompts), default=0)
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=min(4096, longest + max_new_tokens + 64), verbose=False,
                          n_threads=os.cpu_count() or 1)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    answers = []
    try:
        for prompt in prompts:
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            out = []
            for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
                if llama_cpp.llama_vocab_is_eog(vocab, token) or len(out) >= max_new_tokens:
                    break
                out.append(token)
            answers.append(llm.detokenize(out).decode("utf-8", errors="replace").strip())
    finally:
        llm.close()
    return answers
