"""`finetune plan --fit BUDGET`: choose the settings that fit a memory budget and train fastest.

Every combination of the allowed knobs is a candidate recipe, checked by the recipe's own validation, its peak
predicted by the memory plan (finetune.plan.estimate) with the rows' real lengths (finetune.plan.rows), and its speed by
the cost model (finetune.plan.speed) on the device's measured throughput. Among those predicted to fit with
FIT_MARGIN held back, the fastest wins; within NEAR of it, the one that changes the fewest settings. Every other
candidate keeps the reason it lost.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from finetune.errors import UserError
from finetune.plan.memory import CUDA_OVERHEAD, GIB
from finetune.plan.rows import RowLengths
from finetune.plan.speed import Throughput, step_seconds

#: Knob -> what it turns. The defaults leave the maths of training unchanged (the same effective batch, the same
#: loss and updates): the others change the optimizer's precision, where clipping acts, what trains, or the data.
KNOBS = {
    "batch": "micro-batch size, with gradient accumulation keeping the effective batch",
    "checkpointing": "gradient checkpointing (model.gradient_checkpointing)",
    "loss": "the LM head's loss in tiles (train.chunked_loss; CUDA already has it)",
    "packing": "packing rows into max_length sequences (train.packing: rows per step change)",
    "8bit": "8-bit AdamW states (method.optim_bits: 8)",
    "layerwise": "layer-wise optimizer stepping (method.layerwise: gradients clipped per parameter)",
    "method": "the method: LoRA at the recipe's rank, QLoRA (CUDA), GaLore, LISA, full",
    "seq": "data.max_length (longer rows are cut)",
}
DEFAULT_KNOBS = ("batch", "checkpointing", "loss")
#: The recipe keys each knob may change.
KNOB_KEYS = {"batch": ("train.batch_size", "train.gradient_accumulation_steps"),
             "checkpointing": ("model.gradient_checkpointing",), "loss": ("train.chunked_loss",),
             "packing": ("train.packing",),
             "8bit": ("method.optim_bits",), "layerwise": ("method.layerwise",), "method": ("method",),
             "seq": ("data.max_length",)}
#: Held back from the budget: the plan is within 5% of measured peaks on a CPU (BENCHMARKS.md), twice that is kept as
#: a margin for what it does not model (allocator fragmentation, a library's own buffers).
FIT_MARGIN = 0.10
#: Predicted speeds this close count as equal (the cost model's resolution): the candidate with fewer changes wins.
NEAR = 0.03


@dataclass
class Candidate:
    """One setting: its changes to the recipe (dotted key -> value; "method" replaces the whole section), the
    validated recipe, and what the plan and the cost model say of it."""

    changes: dict[str, Any]
    recipe: Any = None
    refused: str | None = None
    peak: float = math.nan  # predicted bytes
    seconds: float = math.nan  # predicted seconds per optimizer step
    tokens: float = math.nan  # trained (not padding) tokens per optimizer step
    verdict: str = ""
    probe: dict | None = None  # measured by `--probe`

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def knobs(self) -> set[str]:
        return {knob for knob, keys in KNOB_KEYS.items() for key in self.changes if key in keys}

    def label(self) -> str:
        return describe(self.changes)

    def overrides(self) -> list[str]:
        """The changes as `--set` overrides (YAML values; a method switch as a flow mapping)."""
        import json

        return [f"{key}={json.dumps(value)}" for key, value in self.changes.items()]


@dataclass
class Fit:
    budget: float
    usable: float
    allowed: tuple[str, ...]
    device: str
    throughput: Throughput
    rows: RowLengths
    overhead: float
    candidates: list[Candidate] = field(default_factory=list)  # the chosen first, then by verdict
    chosen: Candidate | None = None

    def record(self) -> dict:
        """What run.json and `--json` keep: the budget, the choice and why, every candidate."""
        def one(c: Candidate) -> dict:
            return {"changes": c.changes, "peak_gib": c.peak / GIB, "tokens_per_second": c.tokens_per_second,
                    "verdict": c.verdict, **({"probe": c.probe} if c.probe else {})}
        return {"budget_gib": self.budget / GIB, "usable_gib": self.usable / GIB, "margin": FIT_MARGIN,
                "allowed": list(self.allowed), "device": self.device, "throughput": self.throughput.describe(),
                "overhead_gib": self.overhead / GIB, "chosen": one(self.chosen) if self.chosen else None,
                "candidates": [one(c) for c in self.candidates]}


def describe(changes: dict[str, Any]) -> str:
    """The changes in a few words: `batch 4x2` is a micro-batch of 4 with 2 accumulation steps."""
    if not changes:
        return "the recipe as written"
    words = {"model.gradient_checkpointing": "checkpointing", "train.packing": "packing",
             "method.layerwise": "layer-wise", "data.max_length": "max_length", "method.optim_bits": "AdamW bits",
             "train.chunked_loss": "loss in tiles"}
    parts = []
    if "train.batch_size" in changes:
        parts.append(f"batch {changes['train.batch_size']}x{changes.get('train.gradient_accumulation_steps', 1)}")
    for key, value in changes.items():
        if key in ("train.batch_size", "train.gradient_accumulation_steps"):
            continue
        if key == "method":
            options = " ".join(f"{k}={v}" for k, v in value.items() if k != "name")
            parts.append(f"method {value['name']} {options}".strip())
        elif isinstance(value, bool):
            parts.append(f"{words.get(key, key)} {'on' if value else 'off'}")
        else:
            parts.append(f"{words.get(key, key.split('.', 1)[1])} {value}")
    return ", ".join(parts)


def parse_knobs(text: str | None) -> tuple[str, ...]:
    """`--allow`: comma-separated knob names added to the defaults; `all` for every knob."""
    if not text:
        return DEFAULT_KNOBS
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return tuple(KNOBS)
    unknown = [n for n in names if n not in KNOBS]
    if unknown:
        raise UserError(f"--allow {text!r}: unknown knob(s) {', '.join(unknown)}; choose from "
                        + "; ".join(f"{k} ({v})" for k, v in KNOBS.items()) + ", or all")
    return tuple(dict.fromkeys([*DEFAULT_KNOBS, *names]))


def fit_recipe(recipe, budget: float, allowed=DEFAULT_KNOBS, device: str = "cpu", throughput: Throughput | None = None,
               rows: RowLengths | None = None, overhead: float | None = None) -> Fit:
    """The fit for `recipe` in `budget` bytes; raises UserError naming the smallest need when nothing fits."""
    from finetune.models.registry import load_config
    from finetune.plan.estimate import meta_model

    config = load_config(recipe.model.name_or_path)
    rows = rows or RowLengths(recipe.data.max_length)
    if throughput is None:
        throughput = _measure(config, device, recipe)
    overhead = CUDA_OVERHEAD if overhead is None else overhead
    result = Fit(budget, budget * (1 - FIT_MARGIN), tuple(allowed), device, throughput, rows, overhead)
    model = meta_model(config)
    tiles = _tiles_can_help(config, recipe, rows, device)
    candidates = [_assess(recipe, changes, config, model, result)
                  for changes in _variants(recipe, allowed, rows, device, tiles)]
    return _choose(result, candidates, recipe, config, model)


def _measure(config, device, recipe) -> Throughput:
    import torch

    from finetune.plan.speed import measure_throughput

    dtype = torch.bfloat16 if device == "cuda" and recipe.model.dtype in ("auto", "bf16") else torch.float32
    return measure_throughput(config, device, dtype)


def _tiles_can_help(config, recipe, rows: RowLengths, device: str) -> bool:
    """Whether the loss in tiles holds less than the whole logits for the largest micro-batch the batch knob can make
    (the tiles' memory stops growing at 4096 tokens, the logits' does not; below that, no smaller one gains)."""
    from finetune.plan.estimate import loss_bytes, setup_for

    t = recipe.train
    largest = t.batch_size * t.gradient_accumulation_steps
    setup = replace(setup_for(recipe, rows.longest(recipe.data.max_length), largest, on_gpu=device == "cuda"),
                    device=device)
    return loss_bytes(config, replace(setup, chunked_loss=True), True) < \
        loss_bytes(config, replace(setup, chunked_loss=False), True)


def _variants(recipe, allowed, rows: RowLengths, device: str, tiles: bool = True) -> list[dict[str, Any]]:
    """Every combination of the allowed knobs' values, as changes to the recipe (duplicates dropped); the loss in
    tiles only where it can save memory (`tiles`) and is not the default already (CUDA)."""
    t = recipe.train
    axes = []
    if "batch" in allowed:
        effective = t.batch_size * t.gradient_accumulation_steps
        axes.append([{"train.batch_size": b, "train.gradient_accumulation_steps": effective // b}
                     for b in range(1, effective + 1) if effective % b == 0])
    if "checkpointing" in allowed:
        axes.append([{"model.gradient_checkpointing": v} for v in (True, False)])
    if "loss" in allowed and tiles and device == "cpu" and recipe.objective.name == "sft":
        axes.append([{"train.chunked_loss": v} for v in dict.fromkeys((t.chunked_loss, True))])
    if "packing" in allowed:
        axes.append([{"train.packing": v} for v in (False, True)])
    if "seq" in allowed:
        axes.append([{"data.max_length": n} for n in _cuts(recipe.data.max_length, rows)])
    axes.append([{"method": m} for m in _methods(recipe.method, allowed, device)])
    current = _flat_recipe(recipe)
    seen, variants = set(), []
    for combo in itertools.product(*axes):
        merged = {k: v for part in combo for k, v in part.items()}
        changes = _changes(merged, current, recipe.method)
        key = repr(sorted(changes.items(), key=lambda kv: kv[0]))
        if key not in seen:
            seen.add(key)
            variants.append(changes)
    return variants


def _cuts(max_length: int, rows: RowLengths) -> list[int]:
    """max_length and its halvings down to 64 tokens that would still cut something (below the longest row)."""
    cuts, n = [max_length], max_length
    while n // 2 >= 64 and n // 2 < rows.longest(max_length):
        n //= 2
        cuts.append(n)
    return cuts


def _methods(method, allowed, device: str) -> list[dict]:
    """The recipe's method and, with `method` allowed, the others at their defaults (LoRA at the recipe's rank);
    each with its 8-bit and layer-wise variants where those knobs are allowed and the method has them."""
    from finetune.methods import METHODS

    options = [method]
    if "method" in allowed:
        for module in METHODS.values():
            for alternative in module.Options.plan_alternatives(method).values():
                if alternative.name == method.name:  # a variant of the recipe's own method: only what sets it apart
                    alternative = _variant_of(method, alternative)
                    if alternative is None:
                        continue
                quantized = getattr(alternative, "quantize", "none") != "none"
                default_bits = type(alternative).model_fields.get("optim_bits")
                if (quantized and device != "cuda") or (
                        default_bits and alternative.optim_bits != default_bits.default and "8bit" not in allowed):
                    continue
                options.append(alternative)
    dumps = []
    for option in options:
        fields = type(option).model_fields
        bits = {option.optim_bits, 8} if "optim_bits" in fields and "8bit" in allowed else {None}
        layerwise = {option.layerwise, True} if "layerwise" in fields and "layerwise" in allowed else {None}
        for b, lw in itertools.product(sorted(bits, key=str), sorted(layerwise, key=str)):
            dump = option.model_dump(mode="json")
            dump.update({k: v for k, v in (("optim_bits", b), ("layerwise", lw)) if v is not None})
            if dump not in dumps:
                dumps.append(dump)
    return dumps


def _variant_of(method, alternative):
    """The recipe's method with the settings that make `alternative` what it is (those off their defaults, e.g.
    QLoRA's quantize), its other options kept as the recipe has them; None when that changes nothing."""
    defaults = type(alternative)().model_dump()
    own = {k: v for k, v in alternative.model_dump().items() if v != defaults[k] and v != getattr(method, k)}
    return method.model_copy(update=own) if own else None


def _flat_recipe(recipe) -> dict[str, Any]:
    from finetune.run.rundir import flatten

    return flatten(recipe.model_dump(mode="json"))


def _changes(merged: dict[str, Any], current: dict[str, Any], method) -> dict[str, Any]:
    """Only what differs from the recipe; a method of another name replaces the section (its non-default fields)."""
    from finetune.methods import METHODS

    changes = {k: v for k, v in merged.items() if k != "method" and current.get(k) != v}
    new = merged.get("method")
    if new is None:
        return changes
    if new["name"] == method.name:
        changes.update({f"method.{k}": v for k, v in new.items() if current.get(f"method.{k}") != v})
    else:
        defaults = METHODS[new["name"]].Options().model_dump(mode="json")
        changes["method"] = {k: v for k, v in new.items() if k == "name" or defaults.get(k) != v}
    return changes


def candidate_recipe(recipe, changes: dict[str, Any]):
    """The recipe with `changes` applied through the very `--set` overrides `train --fit` passes on, validated as a
    recipe file would be (so the recipe judged here is the one that trains)."""
    from finetune.recipe.load import apply_override
    from finetune.recipe.schema import Recipe

    raw = recipe.model_dump(mode="json")
    for override in Candidate(changes).overrides():
        apply_override(raw, override)
    return Recipe.model_validate(raw)


def _assess(recipe, changes, config, model, fit: Fit) -> Candidate:
    from finetune.plan.estimate import estimate, setup_for

    candidate = Candidate(changes)
    try:
        candidate.recipe = candidate_recipe(recipe, changes)
    except ValidationError as err:
        candidate.refused = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        return candidate
    r = candidate.recipe
    cut, packing = r.data.max_length, r.train.packing
    seq = cut if packing else fit.rows.longest(cut)
    setup = replace(setup_for(r, seq, None, on_gpu=fit.device == "cuda"), device=fit.device,
                    overhead_bytes=fit.overhead)
    candidate.peak = estimate(config, r.method, setup, model)["total"]
    trainable = r.method.planned_trainable(model)
    layers = _decoder_prefix(model)
    micro = setup.batch * (cut if packing else fit.rows.padded(setup.batch, cut)) * setup.sequences
    candidate.seconds = step_seconds(
        config, fit.throughput, micro_tokens=micro, accumulation=setup.accumulation, context=micro / setup.batch,
        layer_trained=sum(n for name, n in trainable.items() if name.startswith(layers)),
        head_trained=config.hidden_size * config.vocab_size if r.method.head_trains else 0.0,
        optimizer_weights=sum(trainable.values()), optim_bits=getattr(r.method, "optim_bits", 32),
        weight_bytes=setup.weight_bytes, checkpointing=setup.checkpointing, head_in_tiles=setup.loss_in_tiles,
        adapted_layers=r.method.planned_adapted_layers(model),
        extra_flops=r.method.planned_step_flops(model))
    per_row = cut if packing else fit.rows.mean(cut)
    candidate.tokens = setup.batch * setup.accumulation * per_row * setup.sequences
    return candidate


def _decoder_prefix(model) -> str:
    from finetune.methods.lisa import decoder_layers

    return decoder_layers(model)[0] + "."


def _choose(fit: Fit, candidates: list[Candidate], recipe, config, model) -> Fit:
    fitting = sorted((c for c in candidates if c.refused is None and c.peak <= fit.usable),
                     key=lambda c: -c.tokens_per_second)
    if not fitting:
        raise UserError(_nothing_fits(fit, candidates, recipe, config, model))
    best = fitting[0].tokens_per_second
    chosen = min((c for c in fitting if c.tokens_per_second >= best * (1 - NEAR)),
                 key=lambda c: (len(c.changes), -c.tokens_per_second))
    chosen.verdict = "chosen: the fastest predicted that fits" + (
        f" (within {NEAR:.0%} of the fastest, with fewer changes)" if chosen is not fitting[0] else "")
    for c in candidates:
        if c is chosen:
            continue
        if c.refused is not None:
            c.verdict = f"refused by the recipe's checks: {c.refused}"
        elif c.peak > fit.usable:
            c.verdict = f"does not fit: {c.peak / GIB:.2f} GiB > {fit.usable / GIB:.2f} GiB usable"
        else:
            c.verdict = f"fits, slower: {chosen.tokens_per_second / c.tokens_per_second:.2f}x the time per token"
    others = [c for c in candidates if c is not chosen]
    others.sort(key=lambda c: (c.refused is not None, c.peak > fit.usable,
                               -c.tokens_per_second if c.peak <= fit.usable else c.peak))
    fit.candidates, fit.chosen = [chosen, *others], chosen
    return fit


def _nothing_fits(fit: Fit, candidates: list[Candidate], recipe, config, model) -> str:
    """One paragraph: the smallest need, the knob that got closest, and what allowing more knobs would reach."""
    valid = [c for c in candidates if c.refused is None]
    if not valid:
        return f"--fit: the recipe's checks refuse every candidate, e.g. {candidates[0].refused}"
    smallest = min(valid, key=lambda c: c.peak)
    single = [c for c in valid if len(c.knobs) == 1]
    closest = min(single, key=lambda c: c.peak) if single else None
    by_knob = (f" The single knob that got closest: {next(iter(closest.knobs))} ({closest.label()}: "
               f"{closest.peak / GIB:.2f} GiB)." if closest else "")
    more = ""
    if set(fit.allowed) != set(KNOBS):
        every = [_assess(recipe, ch, config, model, fit) for ch in _variants(recipe, tuple(KNOBS), fit.rows,
                                                                             fit.device)]  # tiles tried too
        reach = min((c for c in every if c.refused is None), key=lambda c: c.peak)
        extra = sorted(reach.knobs - set(fit.allowed))
        if reach.peak < smallest.peak and extra:
            more = (f" Allowing {','.join(extra)} (--allow {','.join(extra)}) reaches {reach.peak / GIB:.2f} GiB "
                    f"({reach.label()})" + (", which fits." if reach.peak <= fit.usable else ", still too much."))
    return (f"--fit {fit.budget / GIB:.2f} GiB: no setting fits. The smallest need among the allowed knobs "
            f"({', '.join(fit.allowed)}) is {smallest.peak / GIB:.2f} GiB ({smallest.label()}), and "
            f"{fit.usable / GIB:.2f} GiB is usable after the {FIT_MARGIN:.0%} margin.{by_knob}{more}")
