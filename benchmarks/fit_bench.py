"""`finetune plan --fit` against measurement: for each recipe and budget, the fit's choice and every other setting
predicted to fit, each run for a few steps in its own process (finetune.plan.probe: its peak and tokens/s on the
recipe's longest rows), so the table shows whether the choice fits when run, whether it is the fastest that fits, and
how far each prediction is from its probe. A second table does the same across methods (`--allow method,8bit,
layerwise`): the fastest predicted setting of each method that fits, run.

    python -m benchmarks.fit_bench [--recipes recipes/demo.yaml recipes/lora.yaml] [--budgets 1.4,2,3] [--steps 8]

Targets: no probe exceeds its budget; the chosen setting's measured tokens/s within 10% of the fastest measured that
fits; every prediction within 10% of its probe.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from finetune.errors import UserError
from finetune.plan.choose import device_kind, training_overhead
from finetune.plan.fit import DEFAULT_KNOBS, fit_recipe
from finetune.plan.memory import GIB
from finetune.plan.probe import keep_heap_small, probe
from finetune.plan.rows import read_lengths
from finetune.recipe.load import load_recipe

ROW = "| {budget} | {settings} | {peak:.2f} | {probed} | {ratio} | {pred:.0f} | {measured} | {verdict} |"
LINES: list[str] = []  # everything printed, for --out


def emit(text: str) -> None:
    print(text, flush=True)
    LINES.append(text)


HEAD = ("| budget (GiB) | settings | predicted peak (GiB) | probed peak (GiB) | predicted / probed | predicted tok/s | "
        "measured tok/s | verdict |\n|---|---|---|---|---|---|---|---|")


#: (recipe, overrides) -> probe result: a setting that fits several budgets runs once, its result in each table row.
PROBED: dict[tuple, dict] = {}


def run(candidate, path: Path, steps: int) -> dict:
    key = (str(path), tuple(candidate.overrides()))
    if key not in PROBED:
        result = probe(path, candidate.overrides(), steps)
        if "error" in result:
            raise RuntimeError(f"{candidate.label()}: {result['error']}")
        PROBED[key] = result
    candidate.probe = PROBED[key]
    return candidate.probe


def row(budget, candidate) -> str:
    measured = candidate.probe
    return ROW.format(budget=f"{budget:g}", settings=candidate.label(), peak=candidate.peak / GIB,
                      probed=f"{measured['peak_bytes'] / GIB:.2f}" if measured else "",
                      ratio=f"{candidate.peak / measured['peak_bytes']:.2f}" if measured else "",
                      pred=candidate.tokens_per_second,
                      measured=f"{measured['tokens_per_second']:.0f}" if measured else "",
                      verdict=candidate.verdict.split(":")[0])


def verdict_line(budget: float, probed: list) -> str:
    """The three targets for one budget, from its probed candidates (the chosen one first)."""
    chosen = probed[0]
    fastest = max(probed, key=lambda c: c.probe["tokens_per_second"])
    within = all(c.probe["peak_bytes"] <= budget * GIB for c in probed)
    speed = chosen.probe["tokens_per_second"] / fastest.probe["tokens_per_second"]
    error = max(abs(c.peak / c.probe["peak_bytes"] - 1) for c in probed)
    return (f"{budget:g} GiB: probes within the budget: {'yes' if within else 'NO'}; chosen at {speed:.2f} of the "
            f"fastest measured ({fastest.label()}){'' if speed >= 0.9 else ' (target 0.90: MISSED)'}; largest "
            f"prediction error {error:.1%}{'' if error <= 0.10 else ' (target 10%: MISSED)'}")


def budgets_table(path: Path, budgets: list[float], steps: int) -> None:
    recipe = load_recipe(path)
    rows, device = read_lengths(recipe), device_kind()
    overhead = training_overhead(device)
    throughput = None
    emit(f"\n### {path} (default knobs: {', '.join(DEFAULT_KNOBS)})\n\n{HEAD}")
    lines = []
    for budget in budgets:
        try:
            fit = fit_recipe(recipe, budget * GIB, DEFAULT_KNOBS, device, throughput, rows, overhead)
        except UserError as err:
            emit(f"| {budget:g} | (no setting fits) | | | | | | {str(err).split('. ')[1]} |")
            continue
        throughput = fit.throughput  # measured once per recipe: the budgets' predictions then compare
        fitting = [c for c in fit.candidates if c.refused is None and c.peak <= fit.usable]
        for candidate in fitting:
            run(candidate, path, steps)
            emit(row(budget, candidate))
        lines.append(verdict_line(budget, fitting))
    emit(f"\n{throughput.describe() if throughput else ''}\n")
    for line in lines:
        emit(f"- {line}")


def methods_table(path: Path, budget: float, steps: int) -> None:
    recipe = load_recipe(path)
    device = device_kind()
    fit = fit_recipe(recipe, budget * GIB, (*DEFAULT_KNOBS, "method", "8bit", "layerwise"), device,
                     rows=read_lengths(recipe), overhead=training_overhead(device))
    fitting = [c for c in fit.candidates if c.refused is None and c.peak <= fit.usable]
    best = {}
    for candidate in fitting:  # fastest predicted first: the first of each method is its best
        best.setdefault(candidate.recipe.method.name, candidate)
    emit(f"\n### {path}, every method (--allow method,8bit,layerwise), {budget:g} GiB\n\n{HEAD}")
    probed = list(best.values())
    for candidate in probed:
        run(candidate, path, steps)
        emit(row(budget, candidate))
    emit(f"\n- {verdict_line(budget, probed)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", type=Path,
                        default=[Path("recipes/demo.yaml"), Path("recipes/lora.yaml")])
    parser.add_argument("--budgets", default="1.4,2,3", help="GiB, comma-separated, tight to generous")
    parser.add_argument("--methods-budget", type=float, default=2.5, help="GiB for the every-method table")
    parser.add_argument("--steps", type=int, default=8, help="steps per probe (the first is not timed)")
    parser.add_argument("--out", type=Path, help="also write the tables here")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    if device_kind() == "cpu":
        keep_heap_small()  # as `--fit` does before it measures (finetune.plan.choose.fit_for_run)
    from benchmarks.bench import machine

    command = shlex.join(["python", "-m", "benchmarks.fit_bench", *sys.argv[1:]])
    emit(f"`{command}` — {time.strftime('%Y-%m-%d')} — {machine()}\n\nEach setting trained {args.steps} steps in "
         "its own process on the recipe's longest rows (the batches that set the peak), once for all the budgets it "
         f"fits; tokens/s the mean of steps 2-{args.steps}; peaks are the process's peak resident memory (VmHWM), "
         "glibc's heap kept small as `--fit` keeps it")
    for path in args.recipes:
        budgets_table(path, budgets, args.steps)
    methods_table(args.recipes[-1], args.methods_budget, args.steps)
    if args.out:
        args.out.write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
