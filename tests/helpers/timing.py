"""A baseline for the tests that bound how long something takes: the same machine, at the same moment, starting the
Python process every training run starts with (torch, transformers, TRL, peft imported). A bound stated as a multiple
of it follows the machine's speed and load instead of failing whenever a shared machine runs slow."""

from __future__ import annotations

import subprocess
import sys
import time
from functools import cache

ML_STACK = "import torch, transformers, trl, peft"


@cache
def ml_stack_start_seconds(tries: int = 1) -> float:
    """Seconds for a fresh Python to import the ML stack and exit (best of `tries`), measured once per test session.
    One try: a start-up slowed by load only loosens the bounds built on it, which are generous multiples already."""
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", ML_STACK], check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best
