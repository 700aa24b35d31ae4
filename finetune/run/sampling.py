"""Sampling that depends only on which completion is drawn, not on what else is generated beside it.

`generate(do_sample=True)` draws every row of a batch from one random stream, so a completion depends on the batch it
was generated in and on the generator's state: two processes under DDP (each generating its share) sample other
completions than one process generating the whole round, and a resumed run only repeats the first run if the RNG
state was restored exactly. Here each completion gets its own seed, from the run's seed, the step of its generation
round and its row in the round (every process's rows numbered as one round), and is drawn by the Gumbel-max trick
(argmax of the tempered, nucleus-filtered logits plus Gumbel noise: a sample from softmax(logits / T) restricted to
the nucleus, Gumbel 1954; as in Kool et al., arXiv:1903.06059) with counter-based noise: a hash of (seed, position,
token), so the batch of any size, on any device, gives the same draws.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

#: splitmix64's constants (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014),
#: written as signed int64 since torch has no uint64 arithmetic; products wrap, as the hash expects.
_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)  # logical shifts: the arithmetic shift would smear the sign bit
    x = x * _MIX1
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * _MIX2
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


def row_seeds(seed: int, round_step: int, first_row: int, rows: int, device) -> torch.Tensor:
    """One seed per completion: the run's seed, its generation round and its row in the round."""
    index = torch.arange(first_row, first_row + rows, device=device, dtype=torch.int64)
    return _mix(_mix(torch.full_like(index, seed) * _GOLDEN + round_step) + index * _GOLDEN)


class SeededSampler(LogitsProcessor):
    """Applied in place of sampling (generate with do_sample=False): temperature, top-p, then Gumbel noise, so the
    greedy choice is a sample. `seeds`: one per row of the batch."""

    def __init__(self, seeds: torch.Tensor, temperature: float, top_p: float):
        self.seeds, self.temperature, self.top_p = seeds, temperature, top_p
        self.start = None  # the prompts' padded width: positions count from the first generated token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            outside = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1) >= self.top_p  # the top token stays
            scores = scores.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
        if self.start is None:
            self.start = input_ids.shape[1]
        # Counted from the first generated token: a batch's padding must not change a row's draws.
        position = torch.tensor(input_ids.shape[1] - self.start, device=scores.device, dtype=torch.int64)
        tokens = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
        bits = _mix(self.seeds.to(scores.device)[:, None] + position * _GOLDEN + _mix(tokens + 1)[None, :])
        uniform = (((bits >> 11) & ((1 << 53) - 1)).double() + 0.5) / 2.0**53  # in (0, 1), never 0 or 1
        return scores + (-torch.log(-torch.log(uniform))).to(scores.dtype)
