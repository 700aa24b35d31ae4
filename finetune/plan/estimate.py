"""`finetune plan`: predict peak training memory from the model config alone, before any weight is loaded.

The model is instantiated on the meta device (shapes, no storage), so parameter counts are exact for any
architecture transformers knows. Components, each documented where it is computed: weights, optimizer states,
GaLore projectors and LoRA adapters stay for the whole run; activations, the loss's logits (or LM-head tiles),
gradients and optimizer-step temporaries come and go within a step. The peak is the resident part plus the largest of
three moments of a step: the loss backward (all saved activations and the loss's own memory), the
end of backward (activations still held plus every gradient alive), and the optimizer step (gradients plus the
optimizer's temporaries).

Everything is per GPU. Under a sharded strategy (`distributed`), FSDP and ZeRO-3 divide weights, gradients and
optimizer states by the number of processes and add the decoder layers gathered whole at one time (the one
computing and the one prefetched); ZeRO-2 divides gradients and states, ZeRO-1 states only.
"""

from __future__ import annotations

from dataclasses import replace

from finetune.errors import UserError
from finetune.models.registry import load_config
from finetune.plan.memory import GIB, SHARDED, Setup, fused_head_bytes


def meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    with torch.device("meta"):  # a config with a vision tower is a vision-language model's
        auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
        return auto.from_config(config)


def activation_bytes(config, setup: Setup) -> dict[str, float]:
    """Saved activations of one forward, by part.

    Per decoder layer and token, a Llama-style block saves about 8h + 4h_kv + 4I values: the two norm inputs
    and outputs, q and its rotated copy, k and v and their rotated copies, the attention output feeding
    o_proj, and four intermediate-sized tensors of the gated MLP (gate, up, activation, product). Eager
    attention also keeps the heads x seq attention scores and probabilities per token. With checkpointing
    only each layer's input (h values) stays, plus one layer recomputed in full during backward. The loss's own
    memory is `loss_bytes`.
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    h_kv = h * kv // heads
    tokens = setup.seq_len * setup.batch * setup.sequences
    b = setup.weight_bytes
    per_layer = (8 * h + 4 * h_kv + 4 * inter) * b
    if setup.attention == "eager":
        per_layer += 2 * heads * setup.seq_len * b
    stored = layers * h * b + per_layer if setup.checkpointing else layers * per_layer
    return tokens * stored


def loss_bytes(config, setup: Setup, head_trains: bool) -> float:
    """The loss backward's peak beyond the activations.

    In tiles (TRL's fused LM head: train.chunked_loss, by default on CUDA): the tiles, plus the fp32 head-gradient
    buffer the kernel fills when the head trains (and its cast to the weight dtype). Whole (by default on a CPU,
    finetune.run.trainer): the model's own cross-entropy over the whole (tokens, vocab) logits: the logits,
    their fp32 copy (none when they are fp32 already), the fp32 log-softmax and two fp32 gradients of that size
    (measured: 4.08 fp32 copies at 2048 tokens on SmolLM2's vocabulary); the head's gradient is its ordinary one."""
    tokens = setup.seq_len * setup.batch * setup.sequences
    if not setup.loss_in_tiles:
        b = setup.weight_bytes
        return tokens * config.vocab_size * (b + (4 if b != 4 else 0) + 12)
    from finetune.plan.rollout import CPU_TILE_COPIES

    copies = CPU_TILE_COPIES if setup.device == "cpu" else 2
    return fused_head_bytes(config, tokens, setup.weight_bytes, head_trains, tile_copies=copies)


def estimate(config, method, setup: Setup, model=None) -> dict[str, float]:
    """Predicted bytes per component for one method; `total` is the peak (see the module docstring). The method
    itself (its `Options`) says what trains and which optimizer states, gradients and own parts it keeps. `model`:
    the config's meta-device model when the caller already has one (`--fit` estimates hundreds of settings)."""
    model = model if model is not None else meta_model(config)
    params = dict(model.named_parameters())
    trainable = method.planned_trainable(model)
    text, vision = config.get_text_config(), getattr(config, "vision_config", None)
    if vision is not None and not setup.vision_tower_trains:
        trainable = _without_frozen_tower(model, trainable)
    rows = {"weights": sum(p.numel() for p in params.values()) * setup.weight_bytes}
    rows.update(method.planned_rows(model, trainable, setup))
    rows.setdefault("transient", 0.0)
    if setup.device == "cpu":
        rows["transient"] += _cpu_step_temporaries(trainable, params, getattr(method, "optim_bits", 32))
    rows["activations"] = activation_bytes(text, setup) + method.planned_activation_bytes(model, setup)
    rows["loss (LM head)"] = loss_bytes(text, setup, method.head_trains)
    if vision is not None:
        from finetune.plan.vision import vision_activation_bytes

        rows["vision tower"] = vision_activation_bytes(config, setup)
        if setup.vision_tower_trains:  # kept for backward like the language model's
            rows["activations"] += rows.pop("vision tower")
    rows["framework overhead"] = setup.overhead_bytes
    if setup.rollout is not None:  # online RL: the generation round, the reference, the loss over completions
        from finetune.plan.rollout import completion_loss_bytes, rollout_rows

        rows.update(rollout_rows(config, setup))
        rows["loss (LM head)"] = completion_loss_bytes(config, setup, method.head_trains)
        if setup.rollout.reference == "copy":
            rows["reference copy"] = rows["weights"]
    if setup.processes > 1 and setup.sharded:
        for component in setup.sharded:
            rows[component] /= setup.processes
        if "weights" in setup.sharded:
            from finetune.methods.lisa import decoder_layers

            layer = decoder_layers(model)[1][0]
            rows["gathered layers"] = 2 * sum(p.numel() for p in layer.parameters()) * setup.weight_bytes
    resident = sum(rows.get(k, 0.0) for k in ("weights", "optimizer states", "galore projectors", "lora adapters",
                                               "framework overhead", "gathered layers", "reference copy"))
    grads = rows["gradients"]
    in_backward = method.steps_in_backward  # no large optimizer step after backward
    moments = [
        rows["activations"] + rows["loss (LM head)"],
        rows["activations"] + grads + (rows["transient"] if in_backward else 0.0),
        grads + (0.0 if in_backward else rows["transient"]),
        rows.get("generation", 0.0),  # gradients are freed by then (the optimizer step zeroes them to None)
        rows.get("vision tower", 0.0),  # a frozen encoder's forward, before the language model's activations build
    ]
    rows["total"] = resident + max(moments)
    return rows


def _without_frozen_tower(model, trainable: dict[str, int]) -> dict[str, int]:
    """What trains once the vision encoder is frozen (finetune.models.vision.freeze_vision_tower: the projector
    keeps training)."""
    from finetune.models.vision import frozen_tower

    in_frozen_tower, params = frozen_tower(model), dict(model.named_parameters())
    return {name: count for name, count in trainable.items()
            if name not in params  # a method's own part (LoRA adapters, even on the tower): it trains
            or not in_frozen_tower(name)}


def _cpu_step_temporaries(trainable, params, bits) -> float:
    """bitsandbytes' 8-bit update on CPU dequantizes and works in fp32: finetune's chunked version needs ~24 bytes
    per value of one 1M-value chunk. AdamW in 32 bits runs torch's fused kernel (CPU and CUDA), which needs no
    temporaries; so do the 8-bit CUDA kernels."""
    if bits != 8:
        return 0.0
    largest = max((params[n].numel() for n in trainable if n in params), default=0)
    return 24 * min(largest, 256 * 4096)


def parse_memory(text: str, option: str = "--gpu-memory") -> float:
    """'24GiB', '24GB' (10^9), '80g', '24' (GiB), '512MiB' -> bytes."""
    import re

    match = re.fullmatch(r"\s*([\d.]+)\s*(gib|gb|g|mib|mb)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"{option} {text!r}: expected a size like 24GiB or 80GB")
    value, unit = float(match.group(1)), match.group(2) or "gib"
    return value * {"gib": GIB, "g": GIB, "gb": 1e9, "mib": 2**20, "mb": 1e6}[unit]


def comparison_methods(recipe_method):
    """The recipe's method and the usual alternatives each method offers, on the same model."""
    from finetune.methods import METHODS

    methods = {"recipe": recipe_method}
    for module in METHODS.values():
        methods.update(module.Options.plan_alternatives(recipe_method))
    return methods


def setup_for(recipe, seq_len: int | None, batch: int | None, on_gpu: bool = True) -> Setup:
    dtype = recipe.model.dtype
    weight_bytes = 4 if dtype in ("fp32", "fp16") or (dtype == "auto" and not on_gpu) else 2
    attention = "sdpa" if recipe.model.attn_implementation in ("auto", "flash_attention_2") else \
        recipe.model.attn_implementation
    dist = recipe.distributed
    key = "fsdp" if dist.strategy == "fsdp" else (dist.zero_stage or 2) if dist.strategy == "deepspeed" else None
    return Setup(weight_bytes=weight_bytes, seq_len=seq_len or recipe.data.max_length,
                 batch=batch or recipe.train.batch_size, accumulation=recipe.train.gradient_accumulation_steps,
                 checkpointing=recipe.model.gradient_checkpointing, attention=attention,
                 processes=dist.world_size, sharded=SHARDED.get(key, ()),
                 # A preference pair's two answers train in one batch. Its reference costs no training memory: a
                 # no-grad forward with the adapters off holds less than the training forward, and precomputed
                 # log-probabilities are one number per answer.
                 sequences=recipe.objective.sequences_per_row, rollout=_rollout(recipe),
                 chunked_loss=recipe.train.chunked_loss, vision_tower_trains=recipe.model.train_vision_tower)


def _rollout(recipe):
    """The objective's generation round (finetune.plan.rollout); None for the objectives that generate nothing."""
    return recipe.objective.planned_rollout(recipe)


def cheapest_fix(config, method, setup: Setup, budget: float) -> str | None:
    """The first change, from least to most disruptive, after which the run fits; None if none does."""
    from finetune.methods import METHODS

    tries = []
    if setup.rollout is not None:
        from finetune.plan.rollout import rollout_tries

        tries += [(label, method, trial) for label, trial in rollout_tries(setup)]
    if not setup.checkpointing:
        tries.append(("turn on gradient checkpointing (model.gradient_checkpointing: true)", method,
                      replace(setup, checkpointing=True)))
    batch, accumulation = setup.batch, setup.accumulation
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        tries.append((f"train.batch_size: {batch} with train.gradient_accumulation_steps: {accumulation} "
                      "(same effective batch)", method, replace(setup, batch=batch, accumulation=accumulation)))
    switches = sorted((saver for module in METHODS.values() for saver in module.Options.memory_savers()),
                      key=lambda saver: saver[0])
    # Layer-wise methods keep every gradient between micro-batches, so a switch is tried at the recipe's own
    # batch first, then at batch 1 with accumulation.
    small = replace(setup, batch=1, accumulation=setup.batch * setup.accumulation, checkpointing=True)
    for trial, suffix in ((replace(setup, checkpointing=True), ", checkpointing on"),
                          (small, ", batch 1 with accumulation, checkpointing on")):
        for _, options, label in switches:
            tries.append((label + suffix, options, trial))
    seq = setup.seq_len
    while seq > 128:
        seq //= 2
        tries.append((f"data.max_length: {seq}", method, replace(setup, seq_len=seq)))
    for label, candidate, trial in tries:
        if estimate(config, candidate, trial)["total"] <= budget:
            return label
    return None


def plan_recipe(recipe, budget: float, seq_len: int | None = None, batch: int | None = None) -> dict:
    config = load_config(recipe.model.name_or_path)
    from finetune.recipe.distributed import compatibility_problems

    setup = setup_for(recipe, seq_len, batch)
    # A method the recipe's strategy refuses is planned as it would run instead: a whole replica per GPU (DDP).
    estimates = {label: estimate(config, method, setup if not compatibility_problems(method, recipe.distributed)
                                 else replace(setup, sharded=()))
                 for label, method in comparison_methods(recipe.method).items()}
    fits = estimates["recipe"]["total"] <= budget
    fix = None if fits else cheapest_fix(config, recipe.method, setup, budget)
    return {"setup": setup, "estimates": estimates, "fits": fits, "fix": fix, "budget": budget,
            "parameters": sum(p.numel() for p in meta_model(config).parameters())}
