"""The explicit objective registry: what the loss optimises, independent of which parameters train (methods/).

Each module defines `Options` (its recipe section, discriminated on `objective.name`, with what it asks of the data
and of a method) and the trainer it trains with. `sft` learns the assistant's answers; `dpo`, `simpo` and `orpo`
learn to prefer a chosen answer over a rejected one (against a reference policy, or without one); `kto` learns from
single answers labelled desirable or not; `grpo` learns online from the rewards of its own sampled completions."""

from finetune.objectives import dpo, grpo, kto, orpo, sft, simpo

OBJECTIVES = {
    "sft": sft,
    "dpo": dpo,
    "simpo": simpo,
    "orpo": orpo,
    "kto": kto,
    "grpo": grpo,
}
