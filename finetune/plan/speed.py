"""How fast a setting trains: a cost model `finetune plan --fit` ranks the settings that fit by, from the model's shape,
the method and the device's own measured throughput.

A step is `accumulation` micro-batches. Each costs a fixed time per decoder layer (launching its ops: what makes many
small micro-batches slower than a few large ones), the layers' FLOPs at the rate this device reaches on them, and
the LM head's and loss's FLOPs at theirs (a huge matmul and a softmax over the vocabulary behave unlike a layer), all
measured on the model's own layers and head (random weights). The optimizer step adds its memory traffic at the
device's measured copy bandwidth. FLOPs per token follow the usual transformer count (Kaplan et al., arXiv 2001.08361,
section 2.1): forward 2 per weight of every matmul plus attention's 2 x layers x context x width; backward the same
again for the input gradients plus 2 per trained weight for the weight gradients; gradient checkpointing recomputes
the decoder layers' forward once more (Chen et al., arXiv 1604.06174), and a loss in tiles the head's.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

#: Micro-batch tokens at which the decoder layers' rate is measured, and the few tokens whose step is almost all fixed
#: cost (launching each op, Python): a micro-batch costs that once, whatever its size.
LARGE_TOKENS = {"cpu": 1024, "cuda": 8192}
SMALL_TOKENS = 16
#: Decoder layers in the cut model measured (fewer if the model has fewer).
CUT_LAYERS = 4


@dataclass(frozen=True)
class Throughput:
    """What the device sustains in training: FLOP/s on the decoder layers (`flops`) and on the LM head and its loss
    (`head_flops`; the layers' where not measured apart), bytes/s of a large copy, the fixed seconds a micro-batch
    costs per decoder layer, and what a LoRA adapter adds to a layer it wraps: seconds per micro-batch and per token
    (its cast, dropout, skinny matmuls and their gradients: launches more than FLOPs)."""

    device: str
    flops: float
    bandwidth: float
    source: str = "measured"
    head_flops: float | None = None
    layer_overhead: float = 0.0
    adapter_overhead: float = 0.0
    adapter_token_seconds: float = 0.0

    def describe(self) -> str:
        head = f", head and loss {self.head_flops / 1e9:,.0f}" if self.head_flops else ""
        return (f"{self.device}: training GFLOP/s, layers {self.flops / 1e9:,.0f}{head}; "
                f"{self.layer_overhead * 1e3:.2f} ms a layer a micro-batch, a LoRA adapter "
                f"{self.adapter_overhead * 1e3:.2f} ms and {self.adapter_token_seconds * 1e6:.2f} us a token; "
                f"{self.bandwidth / 1e9:,.1f} GB/s copy ({self.source})")


def measure_throughput(config, device: str, dtype) -> Throughput:
    """Time forward and backward of CUT_LAYERS decoder layers (random weights: the real shapes and kernels; the input
    gradients alone, whose rate the weight gradients' matmuls share) at SMALL_TOKENS, their fixed cost, and at
    LARGE_TOKENS, whose extra time is their FLOPs; the LM head and its loss apart at LARGE_TOKENS; and a 256 MiB copy.
    Best of three after a warm-up: a busy moment does not set a rate."""
    import torch
    from transformers import AutoModelForCausalLM

    def timed(fn, repeats=3) -> float:
        fn()
        best = math.inf
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    small = copy.deepcopy(config)
    small.num_hidden_layers = min(CUT_LAYERS, config.num_hidden_layers)
    model = AutoModelForCausalLM.from_config(small, dtype=dtype).to(device)
    model.model.requires_grad_(False)  # weight gradients come once per optimizer step, not per micro-batch
    large = LARGE_TOKENS["cuda" if device == "cuda" else "cpu"]
    seq = min(large, 256)

    def decoder_step(tokens: int) -> None:
        shape = (max(tokens // seq, 1), min(tokens, seq), config.hidden_size)
        embeds = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
        model.model(inputs_embeds=embeds).last_hidden_state.float().sum().backward()

    fixed = timed(lambda: decoder_step(SMALL_TOKENS))
    busy = max(timed(lambda: decoder_step(large)) - fixed, 1e-9)
    hidden = torch.randn(large, config.hidden_size, dtype=dtype, device=device, requires_grad=True)
    head = model.get_output_embeddings()
    targets = torch.randint(0, config.vocab_size, (large,), device=device)

    def head_step() -> None:
        torch.nn.functional.cross_entropy(head(hidden).float(), targets).backward()
        head.zero_grad(set_to_none=True)

    head_seconds = timed(head_step)
    adapter_fixed, adapter_token = _adapter_cost(model, timed, decoder_step, fixed, busy, large)
    layer_flops = training_flops(small, seq, 0.0, 0.0, False, False)[0]  # forward and input gradients
    head_flops = training_flops(small, seq, 0.0, _head_weights(small), False, False)[1]
    source = torch.empty(2**26, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source))
    return Throughput(device, large * layer_flops / busy, 2 * source.numel() * 4 / seconds,
                      head_flops=large * head_flops / head_seconds, layer_overhead=fixed / small.num_hidden_layers,
                      adapter_overhead=adapter_fixed, adapter_token_seconds=adapter_token)


def _adapter_cost(model, timed, decoder_step, fixed: float, busy: float, large: int) -> tuple[float, float]:
    """The same steps with peft's LoRA on every linear layer (rank 8, dropout 0.05: its usual shape): per adapted
    layer, the extra seconds a micro-batch costs and the extra seconds per token."""
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"))
    adapted = sum(1 for name, _ in model.model.named_modules() if name.endswith(".lora_A"))
    with_fixed = timed(lambda: decoder_step(SMALL_TOKENS))
    with_busy = timed(lambda: decoder_step(large)) - with_fixed
    return max(with_fixed - fixed, 0.0) / adapted, max(with_busy - busy, 0.0) / (large * adapted)


def _layer_weights(config) -> float:
    """Matmul weights of all decoder layers (every one trains in the measured steps)."""
    h, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    return config.num_hidden_layers * (h * head_dim * (2 * heads + 2 * kv) + 3 * h * config.intermediate_size)


def _head_weights(config) -> float:
    return config.hidden_size * config.vocab_size


def forward_flops_per_token(config, context: float) -> tuple[float, float]:
    """(decoder layers, LM head) forward FLOPs per token: 2 per weight of every matmul, and causal attention's scores
    and weighted sum (2 x 2 x width per earlier token, half the context on average)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = 2 * 2 * heads * head_dim * context / 2
    return 2 * _layer_weights(config) + layers * attention, 2 * _head_weights(config)


def training_flops(config, context: float, layer_trained: float, head_trained: float, checkpointing: bool,
                   head_in_tiles: bool) -> tuple[float, float]:
    """(decoder layers, the rest) training FLOPs per token: forward, input gradients (as much again), weight gradients
    (2 per trained weight), the layers' forward recomputed under checkpointing, the head's when the loss is in
    tiles (TRL's fused LM head recomputes each tile in backward)."""
    layers, head = forward_flops_per_token(config, context)
    return (2 * layers + 2 * layer_trained + (layers if checkpointing else 0.0),
            2 * head + 2 * head_trained + (head if head_in_tiles else 0.0))


def optimizer_bytes_per_weight(bits: int, weight_bytes: int, device: str) -> float:
    """Memory traffic of one AdamW update per trained weight: read the weight and its gradient, read and write the
    weight and both moments. 8-bit moments are one byte each; on a CPU finetune's 8-bit update dequantizes a chunk to
    fp32 and back (finetune.plan.estimate's 24 bytes of temporaries per value, written and read)."""
    if bits == 8:
        return 3 * weight_bytes + 4 + (48 if device == "cpu" else 0)
    return 3 * weight_bytes + 4 * weight_bytes


def step_seconds(config, throughput: Throughput, *, micro_tokens: float, accumulation: int, context: float,
                 layer_trained: float, head_trained: float, optimizer_weights: float, optim_bits: int,
                 weight_bytes: int, checkpointing: bool, head_in_tiles: bool = False, adapted_layers: int = 0,
                 extra_flops: float = 0.0) -> float:
    """Predicted seconds per optimizer step: `accumulation` micro-batches of `micro_tokens` tokens (padding included:
    it is computed), and one optimizer update over `optimizer_weights` values; `extra_flops` per step for a method's
    own work (GaLore's projections)."""
    layers, head = training_flops(config, context, layer_trained, head_trained, checkpointing, head_in_tiles)
    passes = 2 if checkpointing else 1  # a recomputed forward launches a layer's ops again
    launches = (config.num_hidden_layers * throughput.layer_overhead + adapted_layers * (
        throughput.adapter_overhead + micro_tokens * throughput.adapter_token_seconds)) * passes
    compute = layers / throughput.flops + head / (throughput.head_flops or throughput.flops)
    per_micro = launches + micro_tokens * compute
    update = optimizer_weights * optimizer_bytes_per_weight(optim_bits, weight_bytes, throughput.device) \
        / throughput.bandwidth
    return accumulation * per_micro + update + extra_flops / throughput.flops
