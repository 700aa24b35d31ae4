"""Memory of a no-grad forward pass, to size an evaluation's batch from the plan instead of by trial: a CPU has
no out-of-memory error to back off from (the kernel kills the process or swaps), and on a GPU a trial forward at
every length costs more than the arithmetic."""

from __future__ import annotations

from finetune.plan.memory import kv_cache_bytes, layer_working_bytes

#: Copies of the (tokens, vocabulary) logits a log-likelihood request holds at once: the model's output, its
#: log-softmax, and the slice gathered per continuation (lm-eval's HFLM._loglikelihood_tokens).
LOGIT_COPIES = 3
#: Share of the free memory a batch may take: the rest absorbs the allocator's slack and the batch's padding.
USABLE_SHARE = 0.8


def forward_bytes(config, tokens: int, weight_bytes: int) -> float:
    """One sequence of `tokens` tokens through a forward pass with the KV cache on (as HF models run for
    evaluation), in bytes beyond the resident weights."""
    logits = tokens * config.vocab_size * weight_bytes * LOGIT_COPIES
    return kv_cache_bytes(config, tokens, weight_bytes) + layer_working_bytes(config, tokens, weight_bytes) + logits


def eval_batch_size(config, tokens: int, weight_bytes: int, free_bytes: float, largest: int = 64) -> int:
    """The largest power of two up to `largest` whose batch of `tokens`-token sequences fits USABLE_SHARE of
    `free_bytes` (at least 1: a single sequence that does not fit is the evaluation's own limit)."""
    per_sequence = forward_bytes(config, tokens, weight_bytes)
    batch = 1
    while batch * 2 <= largest and batch * 2 * per_sequence <= USABLE_SHARE * free_bytes:
        batch *= 2
    return batch


def free_memory(device: str) -> float:
    """Bytes a new allocation can take now: the GPU's free memory, or the memory the kernel reports available."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
