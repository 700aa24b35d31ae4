"""How `finetune plan` shows its estimate: one row per method with its memory grouped into the columns a decision
needs, narrow enough for an 80-column terminal, and the same numbers in full as JSON for scripts (`--json`)."""

from __future__ import annotations

from rich import box
from rich.table import Table

from finetune.plan.memory import GIB

#: Table column -> the plan's components it adds up (each listed in the legend).
COLUMNS = {
    "weights": ("weights", "reference copy"),
    "state": ("optimizer states", "galore projectors", "lora adapters"),
    "grads": ("gradients",),
    "activ": ("activations", "vision tower"),
    "loss": ("loss (LM head)",),
    "other": ("transient", "framework overhead", "gathered layers"),
    "gen": ("generation",),
}
LEGEND = ("weights: the model's (and a reference copy's); state: optimizer states, GaLore projectors and LoRA "
          "adapters; activ: saved activations (and a frozen vision encoder's forward); loss: the LM head's loss; "
          "other: step temporaries, framework overhead and gathered layers; gen: a GRPO generation round (KV cache). "
          "peak = weights + state + other plus the largest moment of a step (generation, loss backward, end of "
          "backward, optimizer step), not the row's sum.")


def method_label(key: str, recipe_method: str) -> str:
    return f"recipe ({recipe_method})" if key == "recipe" else key


def plan_table(result: dict, recipe_method: str, title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), title_justify="left")
    table.add_column("method (GiB)", overflow="fold", ratio=1)
    # A column no estimate has a part of (the generation round, but for objective grpo) is left out: width is scarce.
    columns = {name: parts for name, parts in COLUMNS.items()
               if any(part in estimate for estimate in result["estimates"].values() for part in parts)}
    for name in (*columns, "peak"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("fits", justify="center", no_wrap=True)
    for key, estimate in result["estimates"].items():
        cells = [f"{sum(estimate.get(c, 0.0) for c in parts) / GIB:.2f}" for parts in columns.values()]
        fits = estimate["total"] <= result["budget"]
        table.add_row(method_label(key, recipe_method), *cells, f"{estimate['total'] / GIB:.2f}",
                      "[green]yes[/green]" if fits else "[red]no[/red]")
    return table


def plan_json(result: dict, recipe_method: str) -> dict:
    """Every component of every method in GiB, the setup, the verdict and the cheapest fix."""
    setup = result["setup"]
    return {
        "parameters": result["parameters"],
        "setup": {k: getattr(setup, k) for k in ("seq_len", "batch", "sequences", "accumulation", "checkpointing",
                                                 "attention", "weight_bytes", "processes")},
        "budget_gib": result["budget"] / GIB,
        "fits": result["fits"],
        "fix": result["fix"],
        "methods": {method_label(k, recipe_method): {c: v / GIB for c, v in e.items()}
                    for k, e in result["estimates"].items()},
    }


def fit_table(fit, limit: int = 12) -> Table:
    """`--fit`: the chosen setting first, then the others that fit (fastest first), then those that do not (smallest
    first); each with its predicted peak and speed, its probe where one ran, and why it lost."""
    probed = any(c.probe for c in fit.candidates)
    table = Table(title=f"--fit {fit.budget / GIB:.2f} GiB on {fit.device} ({fit.usable / GIB:.2f} GiB usable; knobs: "
                  f"{', '.join(fit.allowed)})", box=box.SIMPLE_HEAD, padding=(0, 1), title_justify="left")
    table.add_column("settings (changes to the recipe)", overflow="fold", ratio=3)
    table.add_column("peak GiB", justify="right", no_wrap=True)
    if probed:
        table.add_column("probed", justify="right", no_wrap=True)
    table.add_column("tok/s", justify="right", no_wrap=True)
    table.add_column("verdict", overflow="fold", ratio=2)
    for candidate in fit.candidates[:limit]:
        peak = f"{candidate.peak / GIB:.2f}" if candidate.refused is None else "-"
        speed = f"{candidate.tokens_per_second:,.0f}" if candidate.refused is None else "-"
        cells = [candidate.label(), peak]
        if probed:
            measured = (candidate.probe or {}).get("peak_bytes")
            cells.append(f"{measured / GIB:.2f}" if measured else "")
        style = "green" if candidate is fit.chosen else None
        table.add_row(*cells, speed, candidate.verdict, style=style)
    return table
