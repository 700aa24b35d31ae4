"""Base against tuned on the same rows: each metric's change, its standard error, and the regression gate."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Change:
    """One task metric, base vs tuned (tuned only for a bare model)."""

    task: str
    metric: str  # lm-eval's key: metric,filter
    n: int | None
    tuned: float
    tuned_stderr: float | None
    higher_is_better: bool
    base: float | None = None
    base_stderr: float | None = None
    delta: float | None = None  # tuned - base
    delta_stderr: float | None = None
    paired: bool = False  # the stderr is that of the per-row differences
    gated: bool = False  # a 0-1 score, so max_regression applies to it

    @property
    def regression(self) -> float:
        """How much worse tuned is than base, in the metric's own direction (negative: better)."""
        if self.delta is None:
            return 0.0
        return -self.delta if self.higher_is_better else self.delta

    def record(self) -> dict:
        return asdict(self)


def compare(tuned: dict, base: dict | None) -> list[Change]:
    """One Change per task metric of the tuned results (finetune.eval.bench.harness.scores), paired with base's."""
    changes = []
    for task, metrics in tuned.items():
        for key, t in metrics.items():
            change = Change(task, key, t["n"], t["value"], t["stderr"], t["higher_is_better"])
            b = (base or {}).get(task, {}).get(key)
            if b is not None:
                change.base, change.base_stderr = b["value"], b["stderr"]
                change.delta = t["value"] - b["value"]
                change.delta_stderr, change.paired = _delta_stderr(t, b)
                change.gated = 0 <= b["value"] <= 1 and 0 <= t["value"] <= 1
            changes.append(change)
    return changes


def _delta_stderr(tuned: dict, base: dict) -> tuple[float | None, bool]:
    """The standard error of tuned - base. With a score per row on the same rows, that of the mean per-row
    difference (the pairing removes the rows' shared difficulty, so it is far smaller than the two errors
    combined); otherwise the two errors combined as if independent."""
    t, b = tuned.get("rows"), base.get("rows")
    if t and b and t.keys() == b.keys() and len(t) > 1:
        differences = [t[row] - b[row] for row in t]
        mean = sum(differences) / len(differences)
        variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
        return math.sqrt(variance / len(differences)), True
    if tuned["stderr"] is not None and base["stderr"] is not None:
        return math.hypot(tuned["stderr"], base["stderr"]), False
    return None, False


def regressions(changes: list[Change], max_regression: float | None) -> list[Change]:
    """The gated metrics that got worse by more than `max_regression` (none without a bound)."""
    if max_regression is None:
        return []
    return [c for c in changes if c.gated and c.regression > max_regression + 1e-12]


def regression_message(found: list[Change], max_regression: float) -> str:
    listed = "; ".join(f"{c.task} {c.metric.split(',')[0]} {c.base:.4f} -> {c.tuned:.4f} ({c.delta:+.4f}"
                       + (f" ± {c.delta_stderr:.4f}" if c.delta_stderr is not None else "") + ")" for c in found)
    return (f"{len(found)} benchmark score(s) dropped by more than max_regression {max_regression}: "
            f"{listed}")
