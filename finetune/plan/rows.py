"""The training rows' token lengths, as `finetune plan --fit` needs them: the longest batch sets the peak (a batch is
padded to its longest row, not to data.max_length), the padding a micro-batch carries sets its cost, and the rows a
shorter max_length would cut are what `--allow seq` reports."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

#: Random batches drawn to estimate a micro-batch's padded length (the expected longest of its rows); 256 gives the
#: mean within a few percent for any batch size, in milliseconds.
DRAWS = 256


@dataclass(frozen=True)
class RowLengths:
    """Token lengths of the training samples as the recipe tokenizes them (cut at `max_length`); `lengths` is empty
    when they are not known (streamed or remote data, objectives other than sft): every row then counts as
    max_length, the plan's worst case."""

    max_length: int
    lengths: tuple[int, ...] = ()

    @property
    def known(self) -> bool:
        return bool(self.lengths)

    def longest(self, cut: int) -> int:
        return min(max(self.lengths), cut) if self.known else cut

    def mean(self, cut: int) -> float:
        return sum(min(n, cut) for n in self.lengths) / len(self.lengths) if self.known else float(cut)

    def rows_cut(self, cut: int) -> int:
        """Samples longer than `cut` tokens (a shorter max_length loses their ends)."""
        return sum(n > cut for n in self.lengths)

    def padded(self, batch: int, cut: int) -> float:
        """Expected tokens per row of a micro-batch of `batch` random samples once padded to its longest."""
        return _padded(self.lengths, batch, cut) if self.known else float(cut)


@lru_cache(maxsize=256)
def _padded(lengths: tuple[int, ...], batch: int, cut: int) -> float:
    rng = random.Random(0)
    size = min(batch, len(lengths))
    return sum(min(max(rng.sample(lengths, size)), cut) for _ in range(DRAWS)) / DRAWS


def read_lengths(recipe, log=lambda *_: None) -> RowLengths:
    """Tokenize (or read from the prepared-data cache) the recipe's training rows, for objectives that train on
    conversations from local or cached data; any other case keeps the worst case."""
    d = recipe.data
    if recipe.objective.data_kind != "conversations" or d.streaming:
        return RowLengths(d.max_length)
    import pyarrow.compute as pc

    from finetune.data.prepare import build_datasets
    from finetune.models.load import load_tokenizer, resolve_model_path, template_for

    path = resolve_model_path(recipe.model.name_or_path, log)
    tokenizer, _ = load_tokenizer(path, recipe.model.trust_remote_code, d.chat_template)
    template = template_for(tokenizer, d.chat_template, d.fold_system, recipe.model.name_or_path)
    data = build_datasets(tokenizer, train=d.train_sources(), train_split=d.train_split, eval=d.eval,
                          eval_split=d.eval_split, eval_fraction=d.eval_fraction, format=d.format,
                          max_length=d.max_length, max_bad_fraction=d.max_bad_fraction, seed=recipe.train.seed,
                          log=log, template=template, cache=d.cache, num_proc=d.num_proc,
                          text=d.text_options())
    lengths = pc.list_value_length(data.train.data.column("input_ids")).to_pylist()
    return RowLengths(d.max_length, tuple(lengths))
