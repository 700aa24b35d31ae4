"""What online RL (objective grpo) adds to the memory plan: the generation round, the reference policy, and the
loss; and the knobs that shrink them.

A round generates every completion it serves at once (train.batch_size x steps_per_generation per process; with a
batch of num_generations that is G x (prompt + completion) sequences per micro-batch served). Generation runs outside
backward, after the optimizer step has freed the gradients, so it is a moment of its own: the weights and optimizer
state plus the KV cache (keys and values of every layer for every token of every sequence) and the prefill's largest
transient. The reference costs nothing with LoRA (adapters off, a no-grad forward) and a frozen copy of the weights
otherwise. The loss is TRL's fused LM head over every position (completion_loss_bytes).
"""

from __future__ import annotations

from dataclasses import replace

from finetune.plan.memory import Setup, fused_head_bytes, kv_cache_bytes, layer_working_bytes


def rollout_rows(config, setup: Setup) -> dict[str, float]:
    """The generation round's peak beyond the resident weights and state, in bytes."""
    r, b = setup.rollout, setup.weight_bytes
    cache = kv_cache_bytes(config, r.sequences * (r.prompt_len + r.completion_len), b)
    # The prefill is a no-grad forward over every prompt, one layer's working set at a time; each decoding step
    # then holds the last position's logits and their fp32 softmax.
    prefill = layer_working_bytes(config, r.sequences * r.prompt_len, b)
    sampling = r.sequences * config.vocab_size * (b + 8)
    return {"generation": cache + max(prefill, sampling)}


#: fp32 copies of a logits tile at the fused head's backward peak without Triton (CPU): TRL's torch fallback
#: (trl.kernels.chunked_logprob._backward_tile) holds the tile's buffer, its tempered logits, log-probabilities,
#: probabilities, the gradient and the log-prob and entropy terms being added to it (the GRPO plan with it is within
#: 4% of the measured peak: BENCHMARKS.md). Triton's kernels hold the tile and one working copy.
CPU_TILE_COPIES = 9


def completion_loss_bytes(config, setup: Setup, head_trains: bool) -> float:
    """TRL's GRPO computes the completions' log-probabilities and entropies with its fused LM head on every device,
    over every position of the sequences (the prompt's labels are masked, not skipped)."""
    copies = CPU_TILE_COPIES if setup.device == "cpu" else 2
    return fused_head_bytes(config, setup.seq_len * setup.batch, setup.weight_bytes, head_trains, copies)


def rollout_tries(setup: Setup) -> list[tuple[str, Setup]]:
    """Changes that shrink a GRPO step, least disruptive first: split the micro-batch (the same completions per
    optimizer step and per round), generate for fewer micro-batches at once, shorter completions, then fewer
    completions per prompt."""
    r, tries = setup.rollout, []
    generations = r.generations
    batch, accumulation = setup.batch, setup.accumulation
    while batch > 1 and (batch // 2) * 2 == batch:
        batch, accumulation = batch // 2, accumulation * 2
        tries.append((f"train.batch_size: {batch} with train.gradient_accumulation_steps: {accumulation} (the same "
                      "completions per step)", replace(setup, batch=batch, accumulation=accumulation)))
    per_round = r.sequences // max(setup.batch, 1)  # micro-batches one round serves (steps_per_generation)
    if per_round > 1 and setup.batch % generations == 0:
        tries.append(("objective.steps_per_generation: 1 (generate for one micro-batch at a time)",
                      replace(setup, rollout=replace(r, sequences=setup.batch))))
    length = r.completion_len
    while length > 32:
        length //= 2
        tries.append((f"objective.max_completion_length: {length} (longer answers are cut)",
                      replace(setup, seq_len=setup.seq_len - r.completion_len + length,
                              rollout=replace(r, completion_len=length))))
    g = generations
    while g > 2 and setup.batch * (g // 2) // generations >= 1:
        g //= 2
        small = setup.batch * g // generations
        tries.append((f"objective.num_generations: {g} with train.batch_size: {small} (fewer completions per "
                      "prompt: a noisier baseline)", replace(setup, batch=small,
                                                            rollout=replace(r, sequences=small * per_round))))
    return tries
