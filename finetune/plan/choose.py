"""`--fit BUDGET` end to end, as `finetune plan` and `finetune train` run it: the device and what the process holds
before any model, the rows' lengths, the fit (finetune.plan.fit), and with `--probe N` the proof by running it
(finetune.plan.probe), stepping to the next candidate while a probe exceeds the budget; `--apply` writes the amended
recipe (finetune.plan.amend)."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError
from finetune.plan.fit import FIT_MARGIN, Fit, fit_recipe, parse_knobs
from finetune.plan.memory import GIB

#: Candidates a `--probe` runs at most before giving up: past the third, the plan is wrong for this run, not unlucky.
PROBE_TRIES = 3


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resident_bytes() -> float:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    import os

    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0


def training_overhead(device: str) -> float | None:
    """On a CPU the budget is the whole process: what a training process holds before its model loads (the
    libraries, the tokenizer, the rows), read from this one after importing the same libraries. On a GPU the plan's
    own CUDA context allowance (None)."""
    if device != "cpu":
        return None
    import datasets  # noqa: F401 - the training stack, loaded as a run loads it
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    return resident_bytes()


def fit_for_run(recipe, recipe_path: Path, overrides: list[str], budget: float, allow: str | None, probe_steps: int,
                log) -> Fit:
    """The fit for a loaded recipe (`overrides` are the command's own `--set`s, passed on to probes)."""
    from finetune.models.registry import load_config
    from finetune.plan.rows import read_lengths

    allowed = parse_knobs(allow)
    if hasattr(load_config(recipe.model.name_or_path), "vision_config"):
        raise UserError("--fit with a vision-language model: not supported yet (its cost model and row lengths are "
                        "the language model's); `finetune plan RECIPE` plans it, methods side by side")
    if probe_steps and recipe.distributed.strategy != "none":
        raise UserError(f"--probe with distributed.strategy {recipe.distributed.strategy}: a probe is one process, "
                        "and a sharded run's peak per GPU needs all of them; fit without --probe (the plan counts the "
                        "sharding), or probe the recipe with `--set distributed.strategy=none` for one GPU's replica")
    device = device_kind()
    if device == "cpu":
        from finetune.plan.probe import keep_heap_small

        # The budget holds on a CPU only with freed tensors returned to the system (finetune.plan.probe); the rates
        # are measured as training will then run, since every large allocation becomes a fresh mapping.
        keep_heap_small()
    log(f"fit: reading the training rows' lengths and measuring this {device}'s training rate ...")
    rows = read_lengths(recipe)
    fit = fit_recipe(recipe, budget, allowed, device=device, rows=rows, overhead=training_overhead(device))
    if probe_steps:
        settle_by_probe(fit, recipe_path, overrides, probe_steps, log)
    return fit


def settle_by_probe(fit: Fit, recipe_path: Path, overrides: list[str], steps: int, log) -> None:
    """Run the chosen candidate for `steps` steps; while its measured peak exceeds the budget, the next fastest."""
    from finetune.plan.probe import probe

    fitting = [c for c in fit.candidates if c.refused is None and c.peak <= fit.usable]
    for rank, candidate in enumerate(fitting[:PROBE_TRIES]):
        log(f"fit: probing {candidate.label()} for {steps} steps in a child process ...")
        result = probe(recipe_path, [*overrides, *candidate.overrides()], steps)
        candidate.probe = result
        if "error" in result and "out of memory" not in result["error"].lower():
            raise UserError(f"--probe: training {candidate.label()} failed in the probe ({result['error']}); "
                            "`finetune train` with these settings (--set) shows the whole error")
        peak = result.get("peak_bytes")
        if peak is not None and peak <= fit.budget:
            log(f"fit: probe peak {peak / GIB:.2f} GiB (predicted {candidate.peak / GIB:.2f}) within the budget "
                f"{fit.budget / GIB:.2f} GiB; {result['tokens_per_second']:.0f} tokens/s")
            if rank:
                candidate.verdict = "chosen: the fastest predicted whose probe stayed within the budget"
                fit.candidates.remove(candidate)
                fit.candidates.insert(0, candidate)
                fit.chosen = candidate
            return
        over = f"{peak / GIB:.2f} GiB measured" if peak is not None else "ran out of memory"
        candidate.verdict = f"probe: {over} > {fit.budget / GIB:.2f} GiB budget (predicted {candidate.peak / GIB:.2f})"
        log(f"[yellow]fit: {candidate.label()}: {candidate.verdict}; trying the next candidate[/yellow]")
    raise UserError(f"--probe: the {min(len(fitting), PROBE_TRIES)} fastest settings predicted to fit in "
                    f"{fit.budget / GIB:.2f} GiB (with a {FIT_MARGIN:.0%} margin) each exceeded it when run: the plan "
                    "underestimates this run. Give --fit a smaller budget, or allow more knobs (--allow)")


def write_applied(fit: Fit, recipe_path: Path, out: Path) -> None:
    """The user's recipe with the chosen changes, each line commented with why; refused if it would overwrite the
    recipe itself or an existing file, and checked to load as a recipe."""
    from finetune.plan.amend import Change, amend_recipe
    from finetune.recipe.load import load_recipe

    if out.exists():
        raise UserError(f"--apply {out}: the file exists; name a new file (nothing was written)")
    if not out.parent.is_dir():
        raise UserError(f"--apply {out}: its directory {out.parent} does not exist")
    reason = (f"fits --fit {fit.budget / GIB:.2f} GiB (predicted peak {fit.chosen.peak / GIB:.2f} GiB"
              + (f", probed {fit.chosen.probe['peak_bytes'] / GIB:.2f}" if fit.chosen.probe else "") + ")")
    changes = [Change(key, value, reason) for key, value in fit.chosen.changes.items()]
    try:
        text = amend_recipe(recipe_path.read_text(), changes)
    except ValueError as err:
        raise UserError(f"--apply: {err}; set it by hand: {' '.join(fit.chosen.overrides())}") from None
    out.write_text(text)
    try:
        load_recipe(out)  # what was written loads and validates, or the user hears why now
    except UserError as err:
        out.unlink()
        raise UserError(f"--apply {out}: the amended recipe does not load there, so it was not kept (paths in a "
                        f"recipe, such as reward files, are relative to its folder):\n{err}") from None
