"""The explicit objective registry: what the loss optimises, independent of which parameters train (methods/).

Each module defines `Options` (its recipe section, discriminated on `objective.name`, with what it asks of the data
and of a method) and the trainer it trains with. `sft` learns the assistant's answers; `dpo` learns to prefer a
chosen answer over a rejected one."""

from finetune.objectives import dpo, sft

OBJECTIVES = {
    "sft": sft,
    "dpo": dpo,
}
