"""What a vision-language model's images add to the plan, beyond the language model's tokens (image tokens are
tokens of the row, so data.max_length already bounds them).

The vision encoder runs on patches: each image token the language model sees stands for several patches (Qwen2-VL
merges 2x2 patches into one token, Idefics3/SmolVLM shuffles scale_factor^2 patches into one, LLaVA keeps one per
patch). The plan's worst case is a row of image tokens alone, max_length of them, so max_length x patches-per-token
patches through the encoder per row. A frozen encoder (the default) saves nothing for backward: its cost is one
layer's working set during its forward, before the language model's activations build up. A trained one keeps
its layers' activations like the language model's.
"""

from __future__ import annotations


def patches_per_token(config) -> int:
    """Encoder patches behind one image token of the language model."""
    vision = config.vision_config
    if getattr(vision, "spatial_merge_size", None):  # Qwen2-VL, Qwen2.5-VL
        return vision.spatial_merge_size ** 2
    if getattr(config, "scale_factor", None):  # Idefics3, SmolVLM: pixel shuffle
        return config.scale_factor ** 2
    per_image = getattr(config, "mm_tokens_per_image", None)  # Gemma-3: pooled to a fixed count
    if per_image and getattr(vision, "image_size", None) and getattr(vision, "patch_size", None):
        return max(1, (vision.image_size // vision.patch_size) ** 2 // per_image)
    return 1


def vision_activation_bytes(config, setup) -> float:
    """The encoder's memory for one micro-batch (see the module docstring): saved activations when it trains, else
    one layer's forward working set."""
    vision = config.vision_config
    h = getattr(vision, "hidden_size", None) or vision.embed_dim
    inter = getattr(vision, "intermediate_size", None) or int(h * getattr(vision, "mlp_ratio", 4))
    layers = getattr(vision, "num_hidden_layers", None) or vision.depth
    patches = setup.seq_len * setup.batch * setup.sequences * patches_per_token(config)
    b = setup.weight_bytes
    per_layer = (8 * h + 4 * inter) * b  # norms, q/k/v and their output, the MLP's hidden (ViT blocks, no gate)
    if setup.vision_tower_trains:
        return patches * (layers * h * b + per_layer if setup.checkpointing else layers * per_layer)
    return patches * ((4 * h + 2 * inter) * b + h * b)  # one layer's live tensors, and the hidden state it passes on
