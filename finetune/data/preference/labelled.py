"""KTO's rows (arXiv:2402.01306): one answer each, labelled desirable or not, for the `kto` objective.

The shapes: TRL's `prompt`/`completion`/`label` (strings or message lists), `messages` with a `label` (the last turn
is the judged answer), LLaMA-Factory's ShareGPT `conversations` with a `kto_tag`, and preference pairs, each of which
gives its chosen answer as desirable and its rejected one as not (TRL's unpair_preference_dataset). Every row is
read through the SFT formats (formats.py) and rendered with the run's chat template, as finetune.data.preference
does for pairs; the label must be a boolean, or the row is refused with its file:row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune.data.formats import normalise, row_tools
from finetune.data.preference.pairs import (
    SavedRow,
    encode_answer,
    is_preference_record,
    normalise_pair,
    read_rows,
)
from finetune.data.template import ChatTemplate

LABELS = ("label", "kto_tag")  # TRL's name and LLaMA-Factory's


@dataclass
class Labelled(SavedRow):
    """One answer after its prompt, and whether it is desirable."""

    prompt: list[dict[str, Any]]
    completion: dict[str, Any]
    label: bool
    source: str
    row: int
    tools: list[dict] | None = None


def is_labelled_record(record: dict) -> bool:
    return any(key in record for key in LABELS) or is_preference_record(record)


def normalise_labelled(record: dict) -> tuple[list[tuple[list[dict], dict, bool]], set[str]]:
    """[(prompt, answer, label)] of one row (two for a preference pair) and its ignored fields; ValueError says why
    the row is refused."""
    if is_preference_record(record):
        prompt, chosen, rejected, ignored = normalise_pair(record)
        return [(prompt, chosen, True), (prompt, rejected, False)], ignored
    key = next((k for k in LABELS if k in record), None)
    if key is None:
        raise ValueError("no `label`: a KTO row marks its answer desirable (true) or not (false)")
    label = record[key]
    if not isinstance(label, bool):
        raise ValueError(f"`{key}` must be true or false (got {label!r})")
    rest = {k: v for k, v in record.items() if k not in LABELS}
    fmt = "sharegpt" if "conversations" in rest else "messages" if "messages" in rest else \
        "prompt_completion" if {"prompt", "completion"} <= rest.keys() else None
    if fmt is None:
        raise ValueError("a KTO row needs `prompt` and `completion`, `messages` or `conversations` besides its label")
    messages, ignored = normalise(rest, fmt)
    answer = messages[-1]
    if answer["role"] != "assistant" or answer.get("weight") == 0:
        raise ValueError("the last turn must be the assistant answer the label judges")
    prompt = [dict(m, weight=0) if m["role"] == "assistant" else m for m in messages[:-1]]  # context only
    return [(prompt, answer, label)], ignored


def read_labelled(source: str, split: str,
                  columns: dict | None = None) -> tuple[list[list[Labelled]], list[str], int, dict]:
    """Every row of a source as its labelled answers: a list per row, so that a held-out split keeps a pair's two
    together (see finetune.data.preference.read_rows)."""
    def answers(record, source, number):
        labelled, extra = normalise_labelled(record)
        tools = row_tools(record)
        return [Labelled(p, a, label, source, number, tools) for p, a, label in labelled], extra

    return read_rows(source, split, is_labelled_record, lambda keys: (
        "objective kto trains on labelled answers (`prompt`, `completion` and a boolean `label`, `messages` with a "
        f"`label`, `conversations` with a `kto_tag`, or preference pairs), and this row has keys {keys}"), answers,
        columns)


def encode_labelled(tokenizer, answers: list[Labelled], max_length: int, template: ChatTemplate):
    """The row's samples for TRL's KTO ({prompt_ids, completion_ids, label} each, a pair's two in one list) and
    whether an answer was cut at max_length."""
    samples, cut = [], False
    for answer in answers:
        prompt, completion, truncated = encode_answer(tokenizer, answer.prompt, answer.completion, answer.tools,
                                                      max_length, template)
        samples.append({"prompt_ids": prompt, "completion_ids": completion, "label": answer.label})
        cut |= truncated
    return samples, cut
