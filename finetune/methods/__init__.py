"""The explicit method registry: one line per method. Each module defines `Options` (its recipe section,
discriminated on `name`, with its capabilities and memory model) and `Method` (what training asks of it)."""

from finetune.methods import full, galore, lisa, lora

METHODS = {
    "full": full,
    "lora": lora,
    "galore": galore,
    "lisa": lisa,
}


def build_method(options):
    """Build the method object from its validated recipe section (flat keyword arguments, no recipe)."""
    return METHODS[options.name].Method(**options.model_dump(exclude={"name"}))
