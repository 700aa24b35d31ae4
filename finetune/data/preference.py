"""Preference rows in, (prompt, chosen, rejected) token ids out, for the `dpo` objective.

The shapes peers' datasets come in, each read through the SFT formats (formats.py) so every field they define is
honoured the same way (a row-level `system`, `tools`, tool calls, content parts, turn weights) or the row refused:
- `prompt` (a string or a message list) with `chosen` and `rejected` (strings, one message, or message lists):
  TRL's explicit-prompt form and UltraFeedback's;
- `chosen` and `rejected` alone, each a whole conversation (TRL's implicit prompt, Anthropic HH as messages): the
  turns they share are the prompt;
- `conversations` (ShareGPT) or `messages` with `chosen` and `rejected` answers, and Alpaca's `instruction` (with
  `input`, `system`, `history`) with them, as LLaMA-Factory writes them.
Each answer is rendered after the shared prompt with the run's chat template (template.py), and only the final
answer is the completion: earlier assistant turns are context. The prompt must tokenise the same before both answers
(TRL's collator shares one prompt between them), and the two answers must differ, or the row is refused. Refused
rows are reported with file:row, as for SFT, and `data.max_bad_fraction` applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.formats import _present, normalise, object_row, row_tools
from finetune.data.prepare import check_bad_fraction, split_held_out
from finetune.data.sources import read_records
from finetune.data.template import ChatTemplate, encode_samples
from finetune.errors import UserError

#: The fields a preference row may carry besides those its prompt's format defines.
ANSWERS = ("chosen", "rejected")


@dataclass
class Pair:
    """One preference row, normalised: the shared prompt and the two answers (assistant messages)."""

    prompt: list[dict[str, Any]]
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    source: str
    row: int
    tools: list[dict] | None = None

    def to_json(self) -> dict:
        saved = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "source": self.source,
                 "row": self.row}
        return {**saved, "tools": self.tools} if self.tools else saved


@dataclass
class PreparedPairs:
    """What the dpo objective trains on; the fields the training flow reads match PreparedData's."""

    train: Any  # datasets.Dataset: prompt_ids, chosen_ids, rejected_ids
    eval: Any | None
    held_out: list[Pair]
    mean_train_tokens: float  # per row: the prompt twice plus both answers, as the model sees them
    truncated: int = 0
    problems: list[str] = field(default_factory=list)
    ignored_lines: list[str] = field(default_factory=list)
    mix: list[dict] = field(default_factory=list)
    cache_line: str | None = None
    streaming: bool = False


def is_preference_record(record: dict) -> bool:
    return all(_present(record.get(key)) for key in ANSWERS)


def normalise_pair(record: dict) -> tuple[list[dict], dict, dict, set[str]]:
    """(prompt, chosen, rejected, ignored fields) of one preference row; ValueError says why it is refused."""
    missing = [key for key in ANSWERS if not _present(record.get(key))]
    if missing:
        raise ValueError(f"no `{missing[0]}` answer: a preference row needs both `chosen` and `rejected`")
    rest = {k: v for k, v in record.items() if k not in ANSWERS}
    if "conversations" in record:
        fmt, key, shape = "sharegpt", "conversations", lambda a: _turns(a, "from", "value", "gpt")
    elif "messages" in record:
        fmt, key, shape = "messages", "messages", lambda a: _turns(a, "role", "content", "assistant")
    elif "instruction" in record:  # LLaMA-Factory's Alpaca pairs: instruction (input, system, history), answers
        fmt, key, shape = "alpaca", "output", lambda a: a
        if "output" in record:
            raise ValueError("both `output` and `chosen`/`rejected`: say which answers the row compares")
    elif "prompt" in record:
        fmt, key, shape = "prompt_completion", "completion", lambda a: _turns(a, "role", "content", "assistant")
        if "completion" in record:
            raise ValueError("both `completion` and `chosen`/`rejected`: say which answers the row compares")
    elif all(isinstance(record[k], list) for k in ANSWERS):  # implicit prompt: two whole conversations
        fmt, key, shape = "messages", "messages", lambda a: a
    else:
        raise ValueError("`chosen` and `rejected` are strings and there is no `prompt` (or `conversations`/"
                         "`messages`) to answer; give the prompt in its own field, or both answers as message lists")
    conversations, ignored, errors = [], set(), {}
    for answer in ANSWERS:
        given = {**rest, key: shape(record[answer])} if fmt in ("alpaca", "prompt_completion") else \
            {**rest, key: (rest.get(key) or []) + shape(record[answer])}
        try:
            messages, extra = normalise(given, fmt)
        except ValueError as err:
            errors[answer] = str(err)
            continue
        conversations.append(messages)
        ignored |= extra
    if errors:  # the answer is named only when the problem is its own, not the row's
        (answer, error), *_ = errors.items()
        raise ValueError(error if len(set(errors.values())) == 1 and len(errors) == 2 else f"`{answer}`: {error}")
    chosen, rejected = conversations
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if chosen == rejected:
        raise ValueError("`chosen` and `rejected` are the same answer: there is nothing to prefer")
    tails = chosen[shared:], rejected[shared:]
    if any(len(tail) != 1 or tail[0]["role"] != "assistant" for tail in tails):
        raise ValueError("after the turns they share, `chosen` and `rejected` must each be one assistant answer "
                         f"(got {len(tails[0])} and {len(tails[1])} turns)")
    prompt = [dict(m, weight=0) if m["role"] == "assistant" else m for m in chosen[:shared]]  # context only
    return prompt, tails[0][0], tails[1][0], ignored


def _turn(answer: Any, role_key: str, content_key: str, role: str) -> dict:
    if isinstance(answer, str):
        return {role_key: role, content_key: answer}
    return answer


def _turns(answer: Any, role_key: str, content_key: str, role: str) -> list:
    """An answer as a list of turns: a list as given, one turn object, or a string as the assistant's text."""
    if isinstance(answer, list):
        return answer
    return [_turn(answer, role_key, content_key, role)]


def encode_pair(tokenizer, pair: Pair, max_length: int, template: ChatTemplate) -> tuple[dict, bool]:
    """The pair's token ids ({prompt_ids, chosen_ids, rejected_ids}) and whether an answer was cut at max_length
    (prompt plus answer, each sequence); ValueError when a row cannot train."""
    encoded = []
    for answer in (pair.chosen, pair.rejected):
        [sample] = encode_samples(tokenizer, pair.prompt + [answer], max_length, pair.tools, template)
        trained = [i for i, label in enumerate(sample.labels) if label != -100]
        if not trained:
            raise ValueError(f"the prompt fills data.max_length={max_length}: no answer token is left (raise "
                             "data.max_length or shorten the prompt)")
        encoded.append((sample.input_ids[:trained[0]], sample.input_ids[trained[0]:trained[-1] + 1],
                        sample.truncated))
    (prompt, chosen, cut_c), (prompt_r, rejected, cut_r) = encoded
    if prompt != prompt_r:
        raise ValueError(f"the chat template ({template.name}) tokenises the prompt differently before the two "
                         "answers, so they cannot share it")
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}, cut_c or cut_r


def read_pairs(source: str, split: str, columns: dict | None = None) -> tuple[list[Pair], list[str], int, dict]:
    """Every row of a source as a Pair; refused rows become `file:row: reason` lines. Also the row count and the
    fields no format uses (name -> rows)."""
    pairs, problems, total, ignored, checked = [], [], 0, {}, False
    for number, value in read_records(source, split):
        total += 1
        try:
            record = object_row(value, columns)
            if not checked and not is_preference_record(record):  # the file's first object row
                raise UserError(f"{source}:{number}: objective dpo trains on preference rows (`prompt` with `chosen` "
                                "and `rejected` answers, or `conversations`/`messages` with them), and this row "
                                f"has keys {', '.join(sorted(record)) or 'none'}; set objective.name: sft to train "
                                "on conversations")
            checked = True
            prompt, chosen, rejected, extra = normalise_pair(record)
            pairs.append(Pair(prompt, chosen, rejected, source, number, row_tools(record)))
            for name in extra:
                ignored[name] = ignored.get(name, 0) + 1
        except ValueError as err:
            problems.append(f"{source}:{number}: {err}")
    if total == 0:
        raise UserError(f"{source}: no rows")
    return pairs, problems, total, ignored


def build_pairs(tokenizer, template: ChatTemplate, train: str, train_split: str, eval: str | None, eval_split: str,
                eval_fraction: float, max_length: int, max_bad_fraction: float, seed: int, log=print,
                columns: dict | None = None) -> PreparedPairs:
    """Read, split (seeded, as for SFT) and tokenise preference rows; raise UserError when too many are bad."""
    import datasets

    pairs, problems, total, ignored = read_pairs(train, train_split, columns)
    lines = [_ignored_line(train, ignored)]
    if eval is not None:
        held, held_problems, held_total, held_ignored = read_pairs(eval, eval_split)
        problems, total = problems + held_problems, total + held_total
        lines.append(_ignored_line(eval, held_ignored))
    else:
        pairs, held = split_held_out(pairs, eval_fraction, seed)
    encoded, truncated = {"train": [], "eval": []}, 0
    for name, rows in (("train", pairs), ("eval", held)):
        kept = []
        for pair in rows:
            try:
                ids, cut = encode_pair(tokenizer, pair, max_length, template)
            except ValueError as err:
                problems.append(f"{pair.source}:{pair.row}: {err}")
                continue
            encoded[name].append(ids)
            kept.append(pair)
            truncated += cut and name == "train"
        if name == "eval":
            held = kept
    for line in lines:
        if line:
            log(line)
    check_bad_fraction(problems, total, max_bad_fraction, log)
    if not encoded["train"]:
        raise UserError(f"{train}: no usable training rows")

    def dataset(rows):
        return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt_ids", "chosen_ids",
                                                                             "rejected_ids")})

    tokens = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in encoded["train"]]
    return PreparedPairs(train=dataset(encoded["train"]), eval=dataset(encoded["eval"]) if encoded["eval"] else None,
                         held_out=held, mean_train_tokens=sum(tokens) / len(tokens), truncated=truncated,
                         problems=problems, ignored_lines=[line for line in lines if line],
                         mix=[{"source": train, "rows": len(encoded["train"])}])


def _ignored_line(source: str, ignored: dict) -> str | None:
    if not ignored:
        return None
    return f"ignored fields in {source}: " + ", ".join(f"{k} ({n} rows)" for k, n in sorted(ignored.items()))


def save_pairs(pairs: list[Pair], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps(pair.to_json()) + "\n")


def read_saved_pairs(path: Path) -> list[Pair]:
    with path.open(encoding="utf-8") as handle:
        return [Pair(**json.loads(line)) for line in handle if line.strip()]


def is_saved_pairs(path: Path) -> bool:
    """Whether a run's held_out.jsonl holds preference pairs (a dpo run) rather than conversations."""
    with path.open(encoding="utf-8") as handle:
        first = handle.readline()
    return bool(first.strip()) and "chosen" in json.loads(first)
