"""`data.streaming`: training rows read, normalised and tokenised as training consumes them, for hub datasets and
files too large to prepare up front.

A stream has no length: the run needs `train.max_steps`, and its held-out data is a separate `data.eval` source,
prepared and cached up front like any data (a fraction of an endless stream is no fixed split). Rows are shuffled
in a seeded buffer, so the order is the same on every run with the same seed, and a resumed run reaches the right
position the way transformers' Trainer resumes any iterable dataset: it replays (and discards) the batches of the
steps already trained. Refused rows are reported as they come; past `max_bad_fraction` of the rows read so far
(after the first CHECK_AFTER rows), the run stops with the reasons.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.markup import escape

from finetune.data.mixture import Source
from finetune.data.sources import row_name
from finetune.data.template import ChatTemplate, trained_samples
from finetune.data.text import EmptyDocument, TextOptions, document_samples
from finetune.errors import UserError

#: Rows in the shuffle buffer: wide enough to mix neighbouring rows of a sorted file, small in memory.
SHUFFLE_BUFFER = 10_000
#: Rows read before the refused share is judged (a few bad rows at the top of a file say little).
CHECK_AFTER = 200
#: Samples read to estimate the mean sample length for the start summary.
LENGTH_PROBE = 256
_SHOWN = 5


class Tally:
    """Rows read and refused so far, per stream, in the training process."""

    def __init__(self, limit: float, log):
        self.limit, self.log, self.read, self.problems = limit, log, 0, []

    def __getstate__(self):  # the stream is copied by pickling (datasets, the Trainer); a console does not pickle
        return {**self.__dict__, "log": print}

    def refused(self, problem: str) -> None:
        self.problems.append(problem)
        if len(self.problems) <= _SHOWN:
            self.log(f"[yellow]skipping {escape(problem)}[/yellow]")
        if self.read >= CHECK_AFTER and len(self.problems) / self.read > self.limit:
            reasons = Counter(p.split(": ", 1)[-1] for p in self.problems).most_common(3)
            raise UserError(f"{len(self.problems)} of the first {self.read} streamed rows are unusable, more than "
                            f"data.max_bad_fraction={self.limit}; e.g. {self.problems[0]}; reasons: "
                            + "; ".join(f"{n}x {reason}" for reason, n in reasons))


def stream_samples(source: Source, tokenizer, template: ChatTemplate, max_length: int, tally: Tally,
                   text: TextOptions | None = None):
    """Samples of one source, in file order: {"input_ids", "labels"}. Empty text documents are skipped (counted as
    read, not refused)."""
    from finetune.data.rows import normalised_rows

    text = text or TextOptions()
    for number, row, _ in normalised_rows(source.path, source.split, source.format, source.columns, streaming=True,
                                          text=text):
        tally.read += 1
        where = row_name(source.path, number)
        try:
            if isinstance(row, ValueError):
                raise row
            messages, _, tools, _ = row
            samples = document_samples(tokenizer, messages, max_length, text) if isinstance(messages, str) else \
                trained_samples(tokenizer, messages, max_length, tools, template)
        except EmptyDocument:
            continue
        except ValueError as err:
            tally.refused(f"{where}: {err}")
            continue
        for sample in samples:
            yield {"input_ids": sample.input_ids, "labels": sample.labels}


def streaming_dataset(sources: list[Source], tokenizer, template: ChatTemplate, max_length: int, seed: int,
                      tally: Tally, text: TextOptions | None = None) -> Any:
    """The training stream: each source's samples, interleaved by weight when there are several, shuffled in a
    seeded buffer."""
    import datasets

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32"))})
    # Generators, not gen_kwargs lists: datasets would shard list-valued gen_kwargs across workers.
    streams = [datasets.IterableDataset.from_generator(
        lambda source=source: stream_samples(source, tokenizer, template, max_length, tally, text), features=features)
        for source in sources]
    if len(streams) == 1:
        stream = streams[0]
    else:
        weights = [source.weight or 1.0 for source in sources]
        stream = datasets.interleave_datasets(streams, probabilities=[w / sum(weights) for w in weights], seed=seed,
                                              stopping_strategy="all_exhausted")
    return stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)


def mean_length(sources: list[Source], tokenizer, template: ChatTemplate, max_length: int,
                text: TextOptions | None = None) -> float:
    """The mean sample length over the first LENGTH_PROBE samples of the first source (for the start summary)."""
    quiet = Tally(1.0, lambda *_: None)
    lengths = []
    for sample in stream_samples(sources[0], tokenizer, template, max_length, quiet, text):
        lengths.append(len(sample["input_ids"]))
        if len(lengths) >= LENGTH_PROBE:
            break
    if not lengths:
        raise UserError(f"{sources[0].path}: no usable training rows among the first {quiet.read} streamed rows"
                        + (f"; the first refused: {quiet.problems[0]}" if quiet.problems else ""))
    return sum(lengths) / len(lengths)
