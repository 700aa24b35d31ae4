"""What `finetune validate` says about a recipe's data: each local source read without a model or tokenizer.

Every row of a local source is normalised exactly as training would (format, refused rows, ignored fields), so a
row that training would refuse is reported wherever it is in the file; a 100k-row JSONL takes about a second
(tests/data/test_data_sources.py times the whole command). Hub datasets are not downloaded, and say so.
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from finetune.data.rows import SourceRows, read_source
from finetune.data.shards import is_glob
from finetune.data.sources import NO_ROWS
from finetune.data.text import count
from finetune.errors import UserError

_SHOWN = 5


def check_data(data, log, kind: str = "conversations", media: bool = False) -> list[str]:
    """Report on each local source of a recipe's `data` section; return the problems that fail validation. `kind`
    is what the recipe's objective trains on: conversations, or preference pairs (finetune.data.preference).
    `media`: the model is a vision-language model, whose rows may have images (each opened and checked)."""
    problems = []
    listed = [("data.train" if data.sources is None else f"data.sources[{i}]", s.path, s.split, s.format, s.columns)
              for i, s in enumerate(data.train_sources())]
    if data.eval is not None:
        listed.append(("data.eval", data.eval, data.eval_split, data.format, {}))
    for label, source, split, format, columns in listed:
        if not Path(source).expanduser().exists() and not is_glob(source):
            log(f"  {label}: hub dataset `{escape(source)}` not checked (validate downloads nothing)")
            continue
        try:
            if kind == "conversations":
                problems += _check_source(label, source, split, format, data.max_bad_fraction, log, columns,
                                          data.text_options(), media)
            else:
                problems += _check_pairs(label, source, split, kind, data.max_bad_fraction, log, columns, media)
        except UserError as err:
            problems.append(f"{label}: {err}")
    return problems


def _check_source(label: str, source: str, split: str, format: str, limit: float, log, columns=None,
                  text=None, media: bool = False) -> list[str]:
    read = read_source(source, split, format, keep=False, columns=columns, text=text, media=media)
    if media and read.format == "text":
        return [f"{label}: {source}: raw text with a vision-language model: not supported yet; train raw text on a "
                "text-only model"]
    return _report(label, read, limit, log)


def _report(label: str, read: SourceRows, limit: float, log) -> list[str]:
    source = read.source
    if read.total == 0:
        return [f"{label}: {source}: {NO_ROWS}"]
    rows = f"{read.total} row" + ("s" if read.total > 1 else "")
    log(f"  {label}: {escape(source)}: {read.format or 'unknown'} format, {rows} (every row checked)")
    if read.ignored:
        log(f"    {escape(read.ignored_line())}")
    if read.empty:
        log(f"    {count(read.empty, 'empty document')}, skipped (nothing to train)")
    if read.problems:
        log(f"    {len(read.problems)} of {read.total} rows refused, e.g.:")
        for problem in read.problems[:_SHOWN]:
            log(f"      - {escape(problem)}")
    if read.empty and read.empty == read.total:  # training would find nothing to train on
        return [f"{label}: {source}: every document is empty (nothing to train)"]
    return [_too_many_refused(label, read, limit)] if read.refused_fraction() > limit else []


def _check_pairs(label: str, source: str, split: str, kind: str, limit: float, log, columns=None,
                 media: bool = False) -> list[str]:
    """A source of preference pairs (dpo, simpo, orpo), labelled answers (kto) or prompts (grpo), read as training
    reads it."""
    from finetune.data.preference.labelled import read_labelled
    from finetune.data.preference.pairs import read_pairs
    from finetune.data.prompts import read_prompts
    from finetune.data.vision_pairs import read_vision_pairs

    reader, what = {"unpaired": (read_labelled, "labelled answers"), "prompts": (read_prompts, "prompts")}.get(
        kind, (read_vision_pairs if media else read_pairs, "preference pairs"))
    _, problems, total, ignored = reader(source, split, columns)
    read = SourceRows(source, what, problems=problems, total=total)
    read.ignored.update(ignored)
    return _report(label, read, limit, log)


def _too_many_refused(label: str, read: SourceRows, limit: float) -> str:
    if len(read.problems) == read.total:  # nothing would train: raising max_bad_fraction is no way out
        return f"{label}: every row ({read.total}) is refused; the first: {read.problems[0]}"
    return (f"{label}: {len(read.problems)} of the {read.total} rows are refused "
            f"({read.refused_fraction():.1%}), more than data.max_bad_fraction={limit}; the first: {read.problems[0]}")
