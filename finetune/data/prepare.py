"""Rows in, token ids with assistant-only labels out.

Reads every row of a source (see sources.py), normalises it to chat `messages` and tools (formats.py, tools.py),
renders it with the run's chat template and masks the loss to what the assistant generates (template.py). Refused
rows are reported with file and row number; the run refuses to start when too many are bad. `finetune data` runs
this same code and reports on it.

Tokenisation happens here rather than inside TRL so that every row's fate is known and reported before
training: TRL would silently drop rows whose assistant tokens all fall past `max_length`.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from finetune.data.cache import cache_key, check_token_ids, prepared
from finetune.data.mixture import Source, draw, planned_rows
from finetune.data.pipeline import (
    conversations,
    encode_source,
    progress_bars,
    sample_tokens,
    select_samples,
)
from finetune.data.rows import (
    Conversation,
    SourceRows,
    check_bad_fraction,
    held_out_indices,
    load_conversations,
    read_saved_conversations,
    save_conversations,
)
from finetune.data.template import ChatTemplate, chat_template, fit_messages
from finetune.data.text import TextOptions, text_line
from finetune.errors import UserError


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels (memory-mapped Arrow)
    eval: Any | None
    eval_conversations: list[Conversation]
    mean_train_tokens: float
    problems: list[str] = field(default_factory=list)
    template: ChatTemplate | None = None
    train_rows: Any = None  # datasets.Dataset: the source (index) and row of each training sample, and if it was cut
    sources: list[str] = field(default_factory=list)
    rows_read: int = 0
    truncated: int = 0  # samples cut at max_length
    cache: str | None = None  # the cache entry the samples were read from or written to
    ignored_lines: list[str] = field(default_factory=list)  # the fields no format uses, per source
    cache_line: str | None = None  # where the prepared data lives, and whether it was prepared again
    mix: list[dict] = field(default_factory=list)  # per training source: rows, samples and tokens it gives
    streaming: bool = False  # `train` is a datasets.IterableDataset read as training goes (stream.py)
    text: list[dict] = field(default_factory=list)  # per text source: its documents, blocks, tokens (text.py)

    def text_lines(self, max_length: int, overlap: int) -> list[str]:
        """What the text sources gave (documents, blocks, tokens, what was split or skipped), one line each."""
        return [text_line(stats["source"], stats, max_length, overlap) for stats in self.text]

    @property
    def all_text(self) -> bool:
        """Every training source is raw text (the sources of a stream are not known before they are read)."""
        return bool(self.text) and len(self.text) >= len(self.mix or self.sources)

    def mix_lines(self) -> list[str]:
        """The training mixture, one line per source: rows and tokens it gives and their shares."""
        rows, tokens = sum(m["rows"] for m in self.mix) or 1, sum(m["tokens"] for m in self.mix) or 1
        return [f"{m['source']}: {m['rows']} rows ({m['rows'] / rows:.1%}), {m['tokens']} tokens "
                f"({m['tokens'] / tokens:.1%})" for m in self.mix]

    def save_held_out(self, path: Path) -> None:
        """The held-out rows as the run keeps them (held_out.jsonl), for `finetune eval`."""
        save_conversations(self.eval_conversations, path)

    def origin(self, index: int) -> tuple[str, int]:
        sample = self.train_rows[index]
        return self.sources[sample["source"]], sample["row"]


def build_datasets(
    tokenizer,
    train: str | list[Source],
    train_split: str,
    eval: str | None,
    eval_split: str,
    eval_fraction: float,
    format: str,
    max_length: int,
    max_bad_fraction: float,
    seed: int,
    log=print,
    template: ChatTemplate | None = None,
    cache: bool = True,
    num_proc: int | None = None,
    streaming: bool = False,
    text: TextOptions | None = None,
) -> PreparedData:
    """Load, normalise, split and tokenise with the tokenizer's chat template (or `template`), on Arrow over
    `num_proc` processes (default: the cores available), cached on disk under a key of the inputs' content (see
    cache.py); raise UserError when too many rows are bad. `train` is one source or a mixture (mixture.py); `text`:
    how text sources are read and cut (text.py)."""
    text = text or TextOptions()
    if template is None:
        try:
            template = chat_template(tokenizer)
        except ValueError as err:
            raise UserError(str(err)) from None
    sources = [Source(train, train_split, format)] if isinstance(train, str) else list(train)
    if streaming:
        return _streamed(tokenizer, template, sources, eval, eval_split, format, max_length, max_bad_fraction, seed,
                         log, cache, num_proc, text)
    # The sources' names too: refusal lines and sample origins name them.
    options = {"sources": [source.key() for source in sources], "eval": eval, "eval_split": eval_split,
               "eval_fraction": eval_fraction, "format": format, "max_length": max_length,
               "seed": seed if eval_fraction > 0 or len(sources) > 1 else None, "text": text.key()}
    paths = {f"train{i}": source.path for i, source in enumerate(sources)}
    key = cache_key(tokenizer, template, {**paths, "eval": eval}, options) if cache else None

    def prepare(directory: Path) -> None:
        with progress_bars([s.path for s in sources] + ([eval] if eval else [])):
            _prepare(tokenizer, template, sources, eval, eval_split, eval_fraction, format, max_length, seed,
                     num_proc, directory, key or "uncached", text)

    data, directory, hit = prepared(key, prepare, lambda entry: _load(entry, template, len(tokenizer)), log)
    for line in data.ignored_lines:
        log(escape(line))
    check_bad_fraction(data.problems, data.rows_read, max_bad_fraction, log)
    if len(data.train) == 0:
        held = len(data.eval) if data.eval is not None and eval is None else 0
        why = (f"; data.eval_fraction held out every usable row ({held} sample(s)): it holds out at least one row, "
               "so the data needs two or more (a .txt/.md file is one document unless data.split_on is line or "
               "blank_line)") if held else ""
        raise UserError(f"{', '.join(s.path for s in sources)}: no usable training rows{why}")
    if key is not None:
        data.cache_line = f"data: {'read from' if hit else 'prepared into'} the cache {directory}"
    return data


def _prepare(tokenizer, template, sources: list[Source], eval, eval_split, eval_fraction, format, max_length, seed,
             num_proc, directory: Path, key: str, text: TextOptions) -> None:
    """Encode the sources, split off the held-out rows, draw the mixture and write the entry: train/ and eval/
    datasets, held_out.jsonl and meta.json (cache.write_complete adds the manifest that marks it complete)."""
    import datasets
    import numpy as np

    work = directory / "work"
    encoded = [encode_source(s.path, s.split, s.format, tokenizer, template, max_length, work / f"train{i}",
                             num_proc, f"{key}-{i}", s.columns, i, text) for i, s in enumerate(sources)]
    problems = [p for e in encoded for p in e.problems]
    rows_read, ignored = sum(e.rows_read for e in encoded), [_ignored_line(e) for e in encoded]
    held_parts, held_out, candidates = [], [], []
    if eval is not None:
        held_encoded = encode_source(eval, eval_split, format, tokenizer, template, max_length, work / "eval",
                                     num_proc, key + "-eval", index=len(sources), text=text)
        problems += held_encoded.problems
        rows_read += held_encoded.rows_read
        ignored.append(_ignored_line(held_encoded))
        held_parts.append(select_samples(held_encoded, 1))
        held_out = conversations(held_encoded, sorted(set(held_encoded.sample_rows.tolist())), template)
    for source in encoded:  # each source gives its share of the held-out rows
        held = np.asarray(held_out_indices(source.pool, eval_fraction, seed) if eval is None else [], dtype=np.int64)
        in_held = np.isin(source.sample_rows, held)
        if in_held.any():
            held_parts.append(select_samples(source, in_held.astype(np.int64)))
            held_out += conversations(source, sorted(set(source.sample_rows[in_held].tolist())), template)
        candidates.append(sorted(set(source.sample_rows[~in_held].tolist())))
    planned = planned_rows(sources, [len(rows) for rows in candidates])
    train_parts, mix = [], []
    for index, (source, rows, wanted) in enumerate(zip(encoded, candidates, planned)):
        chosen = np.asarray(draw(rows, wanted, seed + index), dtype=np.int64)
        times = _times(chosen, source.sample_rows)
        part = select_samples(source, times)
        train_parts.append(part)
        mix.append({"source": source.source, "rows": len(chosen), "samples": len(part),
                    "tokens": sample_tokens(source, times)})
    for name, parts in (("train", train_parts), ("eval", held_parts)):
        parts = [part for part in parts if len(part)]
        if parts:  # datasets cannot load back a saved dataset of no rows
            datasets.concatenate_datasets(parts).save_to_disk(str(directory / name))
    save_conversations(held_out, directory / "held_out.jsonl")
    shutil.rmtree(work, ignore_errors=True)
    meta = {"sources": [s.path for s in sources] + ([eval] if eval else []), "rows_read": rows_read,
            "problems": problems, "ignored_lines": [line for line in ignored if line], "mix": mix,
            "text": [{"source": e.source, **e.stats} for e in encoded if e.stats is not None]}
    (directory / "meta.json").write_text(json.dumps(meta) + "\n")


def _times(chosen, sample_rows):
    """How often each sample's row was drawn; by sorted lookup, as a folder's row numbers are too large to index by
    (finetune.data.shards.STRIDE)."""
    import numpy as np

    drawn, counts = np.unique(chosen, return_counts=True)
    at = np.clip(np.searchsorted(drawn, sample_rows), 0, max(len(drawn) - 1, 0))
    hit = (drawn[at] == sample_rows) if len(drawn) else np.zeros(len(sample_rows), dtype=bool)
    return np.where(hit, counts[at] if len(drawn) else 0, 0)


def _load(directory: Path, template: ChatTemplate, vocabulary: int) -> PreparedData:
    import datasets
    import pyarrow.compute as pc

    from finetune.data.pipeline import sample_features

    meta = json.loads((directory / "meta.json").read_text())
    held = datasets.load_from_disk(str(directory / "eval")) if (directory / "eval").is_dir() else None
    samples = datasets.load_from_disk(str(directory / "train")) if (directory / "train").is_dir() else \
        datasets.Dataset.from_dict({name: [] for name in sample_features()}, features=sample_features())
    for name, dataset in (("train", samples), ("eval", held)):
        if dataset is not None:
            check_token_ids(dataset, vocabulary, name)
    lengths = pc.list_value_length(samples.data.column("input_ids"))
    return PreparedData(
        train=samples.select_columns(["input_ids", "labels"]),
        eval=held.select_columns(["input_ids", "labels"]) if held is not None else None,
        eval_conversations=read_saved_conversations(directory / "held_out.jsonl"),
        mean_train_tokens=pc.mean(lengths).as_py() or 0.0,
        problems=meta["problems"],
        template=template,
        train_rows=samples.select_columns(["source", "row", "truncated"]),
        sources=meta["sources"],
        rows_read=meta["rows_read"],
        truncated=pc.sum(samples.data.column("truncated")).as_py() or 0,
        cache=str(directory),
        ignored_lines=meta["ignored_lines"],
        mix=meta["mix"],
        text=meta.get("text", []),
    )


def _streamed(tokenizer, template, sources, eval, eval_split, format, max_length, max_bad_fraction, seed, log,
              cache, num_proc, text: TextOptions) -> PreparedData:
    """The training rows as a stream; the held-out source (small) prepared and cached up front."""
    from finetune.data.stream import Tally, mean_length, streaming_dataset

    tally = Tally(max_bad_fraction, log)
    data = PreparedData(
        train=streaming_dataset(sources, tokenizer, template, max_length, seed, tally, text),
        eval=None, eval_conversations=[],
        mean_train_tokens=mean_length(sources, tokenizer, template, max_length, text),
        template=template, sources=[s.path for s in sources], streaming=True)
    if eval is not None:
        held = build_datasets(tokenizer, eval, eval_split, None, eval_split, 0.0, format, max_length,
                              max_bad_fraction, seed, log, template, cache, num_proc, text=text)
        kept = set(held.train_rows["row"])
        data.eval, data.problems, data.cache_line = held.train, held.problems, held.cache_line
        data.eval_conversations = [c if c.text is not None else
                                   Conversation(fit_messages(template, c.messages), c.source, c.row, c.tools)
                                   for c in load_conversations(eval, eval_split, format, text=text)[0]
                                   if c.row in kept]
    return data


def _ignored_line(encoded) -> str | None:
    read = SourceRows(encoded.source, ignored=Counter(encoded.ignored))
    return read.ignored_line()


