"""Memory arithmetic that the plan and the methods' own memory models share: what a training step holds, and the
byte counts of optimizer states and gradients. A leaf: it imports nothing of finetune's."""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
#: CUDA context, cuBLAS workspaces and allocator slack that `max_memory_allocated` does not show but the card
#: must hold. 1 GiB is what a PyTorch process on an H100/4090 typically carries beyond its tensors.
CUDA_OVERHEAD = 1.0 * GIB


@dataclass(frozen=True)
class Setup:
    """How the model trains: what memory depends on besides the method."""

    weight_bytes: int  # 4 fp32, 2 bf16 (fp16 training keeps fp32 weights)
    seq_len: int
    batch: int
    accumulation: int
    checkpointing: bool
    attention: str  # sdpa, flash_attention_2 or eager
    overhead_bytes: float = CUDA_OVERHEAD
    device: str = "cuda"  # optimizer kernels differ: fused on CUDA, per-tensor with temporaries on CPU
    processes: int = 1  # GPUs sharing the work
    sharded: tuple[str, ...] = ()  # components divided over them: "weights", "gradients", "optimizer states"
    sequences: int = 1  # sequences per row through the model at once (2 for a preference pair: chosen, rejected)
    rollout: Rollout | None = None  # online RL (objective grpo): what generating the completions adds
    chunked_loss: bool | None = None  # TRL's fused LM head (train.chunked_loss); None: on CUDA, off on a CPU
    vision_tower_trains: bool = False  # a vision-language model's encoder trains (model.train_vision_tower)

    @property
    def loss_in_tiles(self) -> bool:
        return self.chunked_loss if self.chunked_loss is not None else self.device != "cpu"


@dataclass(frozen=True)
class Rollout:
    """One generation round of objective grpo: `sequences` completions sampled at once (every prompt of the round
    times num_generations), each up to prompt + completion tokens; the reference policy a KL term needs."""

    sequences: int
    generations: int  # completions per prompt (a micro-batch holds whole groups)
    prompt_len: int
    completion_len: int
    reference: str | None  # None (beta 0), "adapters_off" (LoRA) or "copy"


#: What each strategy splits over the processes (DDP: nothing, every GPU holds a replica).
SHARDED = {"fsdp": ("weights", "gradients", "optimizer states"), 1: ("optimizer states",),
           2: ("gradients", "optimizer states"), 3: ("weights", "gradients", "optimizer states")}


def adam_state_bytes(numel: int, bits: int, param_bytes: int) -> int:
    """Two moments. torch AdamW keeps them in the parameter's dtype; bitsandbytes' 8-bit AdamW stores tensors
    of at least 4096 elements in one byte each (plus a 4-byte scale per 2048), smaller ones in fp32."""
    if bits == 8 and numel >= 4096:
        return 2 * (numel + 4 * math.ceil(numel / 2048))
    return 2 * numel * (4 if bits == 8 else param_bytes)


def gradient_bytes(trainable, params, wb, layerwise, accumulation) -> float:
    """All trainable gradients at once; layer-wise with no accumulation holds only the largest one at a time
    (each is freed right after its parameter steps)."""
    sizes = [params[n].numel() for n in trainable if n in params]
    if layerwise and accumulation == 1:
        return max(sizes, default=0) * wb
    return sum(sizes) * wb


def kv_cache_bytes(config, tokens: int, weight_bytes: int) -> float:
    """Keys and values of every layer for `tokens` tokens (grouped-query attention keeps num_key_value_heads)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv * head_dim * tokens * weight_bytes


def layer_working_bytes(config, tokens: int, weight_bytes: int) -> float:
    """A no-grad forward's largest transient inside one decoder layer: hidden states, q/k/v and the MLP's
    intermediates for every token (the previous layer's are freed first)."""
    return tokens * (4 * config.hidden_size + 3 * config.intermediate_size) * weight_bytes


#: TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) never materialises the (tokens, vocab) logits: it
#: projects tiles of up to 4096 tokens x 32768 vocabulary entries.
LM_HEAD_TOKENS, LM_HEAD_VOCAB = 4096, 32768


def fused_head_bytes(config, tokens: int, weight_bytes: int, head_trains: bool, tile_copies: float) -> float:
    """TRL's fused LM head: a tile of up to LM_HEAD_TOKENS x LM_HEAD_VOCAB logits held `tile_copies` times in fp32 at
    its backward's peak, plus the fp32 head-gradient buffer (and its cast to the weight dtype) when the head trains."""
    tiles = min(tokens, LM_HEAD_TOKENS) * min(config.vocab_size, LM_HEAD_VOCAB) * 4 * tile_copies
    head = config.vocab_size * config.hidden_size * (4 + (weight_bytes if weight_bytes != 4 else 0))
    return tiles + (head if head_trains else 0)
