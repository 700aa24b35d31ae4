"""The fit table of the GPU acceptance check (benchmarks/gpu_check.py, `--fit-table`): `finetune plan --fit` at the
cap on recipes/llama7b-galore.yaml with its default knobs, with `--allow method`, and on a LoRA variant; the chosen
setting and the next that fit each train a few steps in gpu_check's capped child (random weights), the allocator held
to the budget less the child's CUDA context. Per setting: predicted and measured peak (the card's: reserved plus
context), predicted and measured tokens/s, fit's verdict; per fit a line on its targets: no measured peak above the
budget, the choice within 10 % of the fastest measured setting that fits, every predicted peak within 10 % of its
measurement. On a CPU it runs on the tiny model as a smoke test, its targets not checked."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

from benchmarks.bench import summarise
from benchmarks.gpu_check import GIB, cell, run_capped
from benchmarks.measure import ROOT, write_rows

#: The recipe `finetune plan --fit` chooses settings for (the issue's: GaLore on Llama-2-7B in 24 GiB).
FIT_RECIPE = "recipes/llama7b-galore.yaml"
#: name -> (--set overrides of the recipe, --allow): fit's default knobs, `--allow method`, and a LoRA variant with
#: the default knobs. The variant is LoRA at its defaults, the LoRA that `--allow method` proposes, so that the
#: settings both fits choose run once.
FITS = {"galore": ([], None), "galore+method": ([], "method"), "lora": (['method={"name": "lora"}'], None)}
#: The fit's targets: every measured peak within the budget, the chosen setting at least this fraction of the fastest
#: measured one that fits, every predicted peak within this many percent of its measurement.
FIT_VS_FASTEST, FIT_PEAK_ERROR = 0.9, 10.0


def fit_overrides(name: str, args, cuda: bool) -> list[str]:
    """The recipe's --set overrides for this check's setting: the mode's seq, batch and GaLore rank where they differ
    from the file (on a GPU they do not), on a CPU the tiny model in fp32; then the fit's own."""
    from finetune.recipe.load import load_recipe
    from finetune.run.rundir import flatten

    written = flatten(load_recipe(ROOT / FIT_RECIPE).model_dump(mode="json"))
    wanted = {"data.max_length": args.seq_len, "train.batch_size": args.batch, "method.rank": args.galore_rank,
              "method.update_proj_gap": args.gap}
    if not cuda:  # the smoke's fp32 (the methods table's), whatever dtype the recipe names
        wanted |= {"model.name_or_path": args.model, "model.dtype": "auto"}
    return [f"{key}={value}" for key, value in wanted.items() if written.get(key) != value] + FITS[name][0]


def throughput_child(spec: dict) -> dict:
    """The device's training rate (finetune.plan.speed) for the model spec["throughput"], in the dtype fit uses."""
    import dataclasses

    import torch

    from finetune.models.registry import load_config
    from finetune.plan.speed import measure_throughput

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and spec["dtype"] in ("auto", "bf16") else torch.float32
    return dataclasses.asdict(measure_throughput(load_config(spec["throughput"]), "cuda" if cuda else "cpu", dtype))


def fit_throughput(recipe, cuda: bool, timeout: float):
    """Measured in a child on a GPU (this process stays off the card the runs use), here on a CPU."""
    from finetune.plan.speed import Throughput

    spec = {"throughput": recipe.model.name_or_path, "dtype": recipe.model.dtype}
    result = run_capped(spec, timeout) if cuda else throughput_child(spec)
    if "error" in result:
        raise RuntimeError(f"measuring the training rate failed: {result['error']}")
    return Throughput(**result)


def fit_budget(args, recipe, throughput, overhead, device: str) -> float:
    """GiB: --fit-gib, else the cap (a GPU). The CPU smoke has no card to stand for: there the median candidate's
    predicted peak plus the fit's margin, so that about half of them fit."""
    import statistics

    from finetune.plan.fit import FIT_MARGIN, fit_recipe, parse_knobs

    if args.fit_gib or device == "cuda":
        return args.fit_gib or args.cap_gib
    every = fit_recipe(recipe, math.inf, parse_knobs("method"), device=device, throughput=throughput,
                       overhead=overhead)
    peaks = [c.peak for c in every.candidates if c.refused is None]
    return statistics.median(peaks) / (1 - FIT_MARGIN) / GIB


def candidate_spec(candidate, args, workdir: Path, cuda: bool, budget_gib: float) -> dict:
    """benchmarks.measure's spec for a candidate's recipe: what the spec has keys for, the rest in "set"."""
    r = candidate.recipe
    method = r.method.model_dump(mode="json")
    galore = method if method["name"] == "galore" else {}  # measure gives GaLore the spec's rank and gap
    rows = r.train.batch_size * r.train.gradient_accumulation_steps * args.fit_steps
    data = workdir / f"fit-rows-{r.data.max_length}-{rows}.jsonl"
    if not data.exists():
        write_rows(data, rows, r.data.max_length)
    return {"model": args.model if cuda else r.model.name_or_path, "arch": r.model.name_or_path if cuda else None,
            "data": str(data), "seq_len": r.data.max_length, "batch": r.train.batch_size, "steps": args.fit_steps,
            "galore_rank": galore.get("rank", args.galore_rank), "gap": galore.get("update_proj_gap", args.gap),
            "checkpointing": r.model.gradient_checkpointing, "packing": r.train.packing, "method": method,
            "card_gib": budget_gib, "set": {"train.gradient_accumulation_steps": r.train.gradient_accumulation_steps,
                                            "model.dtype": r.model.dtype}}


def fit_row(candidate, chosen: bool, spec: dict, result: dict, args, cuda: bool) -> dict:
    """A candidate's prediction beside its run: on a GPU the card's peak (the allocator's reservation and the CUDA
    context, what --probe measures), on a CPU the resident peak of the steps."""
    row = {"settings": candidate.label(), "chosen": chosen, "changes": candidate.changes, "verdict": candidate.verdict,
           "predicted_gib": candidate.peak / GIB, "predicted_tokens_per_s": candidate.tokens_per_second,
           "measured_gib": None, "peak_error_pct": None, "tokens_per_s": None, "status": "ran", "detail": ""}
    for status in ("skipped", "error"):
        if status in result:
            return row | {"status": status, "detail": result[status]}
    if "oom" in result:
        return row | {"status": "OOM", "detail": f"{result['allocated_gb']:.2f} GiB allocated at the failure"}
    measured = result["reserved_gb"] + result["context_gb"] if cuda else result["peak_gb"]
    micro_rows = spec["batch"] * spec["set"]["train.gradient_accumulation_steps"]
    tokens = summarise({"run": result}, args.warmup, spec["seq_len"], micro_rows)["run"]["tokens_per_s"]
    return row | {"measured_gib": measured, "tokens_per_s": tokens, "peak_error_pct": 100 * (row["predicted_gib"]
                  - measured) / measured, **({"allocated_gib": result["peak_gb"]} if cuda else {})}


def fit_section(args, workdir: Path, cuda: bool) -> list[dict]:
    """Per fit: the chosen candidate and the next that fit (--fit-runs, in fit's order), each run for --fit-steps."""
    from finetune.errors import UserError
    from finetune.plan.choose import training_overhead
    from finetune.plan.fit import fit_recipe, parse_knobs
    from finetune.recipe.load import load_recipe

    device = "cuda" if cuda else "cpu"
    sets = {name: fit_overrides(name, args, cuda) for name in args.fits}
    recipes = {name: load_recipe(ROOT / FIT_RECIPE, sets[name]) for name in args.fits}
    first = recipes[args.fits[0]]
    deadline = time.monotonic() + args.fit_budget_s
    try:
        throughput = fit_throughput(first, cuda, args.fit_timeout)
    except RuntimeError as err:  # a GPU child's failure: the methods' results stand, each fit says why it did not run
        budget = args.fit_gib or args.cap_gib
        return [{"name": name, "command": fit_command(sets[name], budget, FITS[name][1]), "budget_gib": budget,
                 "rows": [], "error": str(err)} for name in args.fits]
    overhead = training_overhead(device)
    budget = fit_budget(args, first, throughput, overhead, device)
    measured: dict[str, dict] = {}
    tables = []
    for name in args.fits:
        allow = FITS[name][1]
        table = {"name": name, "command": fit_command(sets[name], budget, allow), "budget_gib": budget, "rows": []}
        tables.append(table)
        try:
            fit = fit_recipe(recipes[name], budget * GIB, parse_knobs(allow), device=device, throughput=throughput,
                             overhead=overhead)
        except UserError as err:
            table["error"] = str(err)
            continue
        fitting = [c for c in fit.candidates if c.refused is None and c.peak <= fit.usable]
        table |= {"usable_gib": fit.usable / GIB, "candidates": len(fit.candidates), "fitting": len(fitting),
                  "throughput": fit.throughput.describe()}
        for candidate in fitting[:args.fit_runs]:
            spec = candidate_spec(candidate, args, workdir, cuda, budget)
            key = json.dumps(spec, sort_keys=True)
            if key not in measured:
                measured[key] = run_fit_candidate(candidate, spec, workdir / f"fit-{len(measured)}", deadline, args)
            table["rows"].append(fit_row(candidate, candidate is fit.chosen, spec, measured[key], args, cuda))
    return tables


def run_fit_candidate(candidate, spec: dict, out: Path, deadline: float, args) -> dict:
    left = deadline - time.monotonic()
    if left < 30:  # too little to load a model and take a step
        return {"skipped": f"the fit table's time budget of {args.fit_budget_s:.0f} s was spent"}
    print(f"fit table: running {candidate.label()} ...", file=sys.stderr, flush=True)
    result = run_capped(spec | {"out": str(out)}, min(args.fit_timeout, left))
    shutil.rmtree(out, ignore_errors=True)
    return result


def fit_command(sets: list[str], budget: float, allow: str | None) -> str:
    words = ["finetune", "plan", FIT_RECIPE, "--fit", f"{budget:.4g}GiB"] + (["--allow", allow] if allow else [])
    return shlex.join(words + [part for s in sets for part in ("--set", s)])


def fit_markdown(tables: list[dict], args, cuda: bool) -> str:
    peak = ("the allocator's reserved peak plus the CUDA context: what the card holds, as `--probe` measures it; "
            "each run's allocator capped at the budget less its context" if cuda
            else "the process's resident peak during the steps (CPU smoke: the tiny model, a budget that about half "
                 "the candidates fit)")
    lines = ["## Fit table", "", f"`finetune plan --fit`'s choice and the next candidates that fit, each trained "
             f"{args.fit_steps} steps in a fresh process (random weights; every row max_length tokens, the fit's "
             f"worst case for unknown rows). Measured peak: {peak}. tokens/s after the first {args.warmup} step(s)."]
    for table in tables:
        lines += ["", f"### `{table['command']}`", ""]
        if "error" in table:
            lines.append(f"Nothing ran: {table['error']}")
            continue
        lines.append(f"{table['candidates']} candidates, {table['fitting']} predicted to fit in "
                     f"{table['usable_gib']:.2f} GiB usable; {len(table['rows'])} ran. {table['throughput']}.")
        lines += ["", "| settings | predicted peak GiB | measured peak GiB | peak error | measured tokens/s | "
                      "predicted tokens/s | verdict |", "|---|---|---|---|---|---|---|"]
        for r in table["rows"]:
            run = cell(r["measured_gib"], ".2f") if r["status"] == "ran" else \
                f"{r['status']}: {r['detail'][:120]}".replace("|", "\\|")
            lines.append(f"| {r['settings']} | {r['predicted_gib']:.2f} | {run} | "
                         f"{cell(r['peak_error_pct'], '+.1f', ' %')} | {cell(r['tokens_per_s'], '.0f')} | "
                         f"{r['predicted_tokens_per_s']:.0f} | {r['verdict']} |")
        lines += ["", fit_targets(table, cuda)]
    return "\n".join(lines)


def chosen_check(rows: list[dict], within: list[dict], over: list[dict]) -> tuple[bool, str | None, str]:
    """(holds, why it cannot be checked, the measured ratio): a chosen setting that ran over the budget fails."""
    chosen = next((r for r in rows if r["chosen"]), None)
    if chosen in over:
        return False, None, f"the chosen setting exceeded the budget ({chosen['status']})"
    if chosen not in within:
        return False, f"the chosen run {chosen['status'] if chosen else 'is absent'}", "—"
    fastest = max(within, key=lambda r: r["tokens_per_s"])
    ratio = chosen["tokens_per_s"] / fastest["tokens_per_s"]
    return ratio >= FIT_VS_FASTEST, None, f"{ratio:.2f}x of {fastest['settings']}"


def fit_targets(table: dict, cuda: bool) -> str:
    """One line: the budget held by every run, the choice close to the fastest measured, every prediction close."""
    rows, budget = table["rows"], table["budget_gib"]
    ran = [r for r in rows if r["measured_gib"] is not None]
    over = [r for r in rows if r["status"] == "OOM" or (r["measured_gib"] or 0) > budget]
    within = [r for r in ran if r not in over]
    worst = max(ran, key=lambda r: abs(r["peak_error_pct"]), default=None)
    none = None if ran or over else "no run completed"
    checks = [
        (f"measured peak <= {budget:.4g} GiB", not over, none,
         cell(max((r["measured_gib"] for r in ran), default=None), ".2f", " GiB max")
         + "".join(f"; OOM: {r['settings']}" for r in over if r["status"] == "OOM")),
        (f"chosen >= {FIT_VS_FASTEST:g}x the fastest measured that fits", *chosen_check(rows, within, over)),
        (f"predicted peaks within ±{FIT_PEAK_ERROR:g} % of measured", worst is not None and all(
            abs(r["peak_error_pct"]) <= FIT_PEAK_ERROR for r in ran), None if ran else "no peak measured",
         f"worst {worst['peak_error_pct']:+.1f} % ({worst['settings']})" if worst else "—"),
    ]
    missed = [r for r in rows if r["status"] in ("error", "skipped")]
    outcomes = []
    for name, holds, missing, value in checks:
        outcome = "NOT CHECKED (CPU smoke)" if not cuda else f"NOT CHECKED ({missing})" if missing else \
            "PASS" if holds else "FAIL"
        outcomes.append(f"{name}: {outcome} ({value})")
    return (f"- Fit targets ({len(ran)} of {len(rows)} runs measured"
            + (f"; not measured: {', '.join(r['status'] for r in missed)}" if missed else "") + "): "
            + "; ".join(outcomes))


def add_options(parser) -> None:
    """gpu_check's options for the fit table."""
    import argparse

    fit = parser.add_argument_group("fit table", f"`finetune plan --fit` on {FIT_RECIPE}: its candidates, run")
    fit.add_argument("--fit-table", action=argparse.BooleanOptionalAction, default=True, help="after the methods")
    fit.add_argument("--fit-only", action="store_true", help="the fit table alone (no methods table)")
    fit.add_argument("--fits", nargs="+", choices=list(FITS), default=None,
                     help="default: all (GPU) / galore+method (CPU smoke)")
    fit.add_argument("--fit-gib", type=float, default=None,
                     help="the budget; default --cap-gib (GPU) / half the candidates fit (CPU smoke)")
    fit.add_argument("--fit-runs", type=int, default=None, help="candidates run per fit; default 4 (GPU) / 2 (CPU)")
    fit.add_argument("--fit-steps", type=int, default=3, help="optimizer steps per candidate")
    fit.add_argument("--fit-timeout", type=float, default=120, help="seconds one candidate may take")
    fit.add_argument("--fit-budget-s", type=float, default=200, help="seconds for the fit table (then: skipped)")
