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

from dataclasses import asdict, dataclass
from typing import Any

from finetune.data.formats import normalise, object_row, present, row_tools
from finetune.data.sources import read_records, row_name
from finetune.data.template import ChatTemplate, encode_samples
from finetune.errors import UserError

#: The fields a preference row may carry besides those its prompt's format defines.
ANSWERS = ("chosen", "rejected")


class SavedRow:
    """A held-out row as run dirs keep it (held_out.jsonl) for `finetune eval`."""

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "tools" or v}


@dataclass
class Pair(SavedRow):
    """One preference row, normalised: the shared prompt and the two answers (assistant messages)."""

    prompt: list[dict[str, Any]]
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    source: str
    row: int
    tools: list[dict] | None = None


def is_preference_record(record: dict) -> bool:
    return all(present(record.get(key)) for key in ANSWERS)


def normalise_pair(record: dict, media: bool = False) -> tuple[list[dict], dict, dict, set[str]]:
    """(prompt, chosen, rejected, ignored fields) of one preference row; ValueError says why it is refused.
    `media`: `<image>` placeholders stand for images (finetune.data.images took them out of the row)."""
    missing = [key for key in ANSWERS if not present(record.get(key))]
    if missing:
        raise ValueError(f"no `{missing[0]}` answer: a preference row needs both `chosen` and `rejected`")
    rest = {k: v for k, v in record.items() if k not in ANSWERS}
    whole = all(isinstance(record[k], list) and any(isinstance(t, dict) and t.get("role", t.get("from")) not in
                                                    ("assistant", "gpt") for t in record[k]) for k in ANSWERS)
    if whole:  # both answers are whole conversations (TRL's implicit prompt, UltraFeedback, HH as messages)
        rest = _redundant_prompt_fields(record, rest)
        fmt, key = ("sharegpt", "conversations") if "from" in record["chosen"][0] else ("messages", "messages")
        shape = _as_given
    elif "conversations" in record:
        fmt, key, shape = "sharegpt", "conversations", lambda a: _turns(a, "from", "value", "gpt")
    elif "messages" in record:
        fmt, key, shape = "messages", "messages", lambda a: _turns(a, "role", "content", "assistant")
    elif "instruction" in record:  # LLaMA-Factory's Alpaca pairs: instruction (input, system, history), answers
        fmt, key, shape = "alpaca", "output", _as_given
        if "output" in record:
            raise ValueError("both `output` and `chosen`/`rejected`: say which answers the row compares")
    elif "prompt" in record:
        fmt, key, shape = "prompt_completion", "completion", lambda a: _turns(a, "role", "content", "assistant")
        if "completion" in record:
            raise ValueError("both `completion` and `chosen`/`rejected`: say which answers the row compares")
    elif all(isinstance(record[k], str) and "\n\nHuman:" in record[k] for k in ANSWERS):
        raise ValueError("`chosen` and `rejected` are Anthropic HH's raw transcripts (`Human:`/`Assistant:` text): "
                         "convert them to message lists (as TRL's trl-lib/hh-rlhf-helpful-base does) so the chat "
                         "template can render the turns")
    else:
        raise ValueError("`chosen` and `rejected` are strings and there is no `prompt` (or `conversations`/"
                         "`messages`) to answer; give the prompt in its own field (a file's own name maps to it with "
                         "data.sources: [{path: ..., columns: {prompt: question}}]), or both answers as message "
                         "lists")
    conversations, ignored, errors = [], set(), {}
    for answer in ANSWERS:
        given = {**rest, key: shape(record[answer])} if fmt in ("alpaca", "prompt_completion") else \
            {**rest, key: (rest.get(key) or []) + shape(record[answer])}
        try:
            messages, extra = normalise(given, fmt, media)
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


def _redundant_prompt_fields(record: dict, rest: dict) -> dict:
    """A row whose answers are whole conversations may repeat them (UltraFeedback's `prompt`: the first user text;
    its `messages`: the chosen conversation for SFT). They are checked against the answers, then left out; a
    disagreeing one refuses the row, since which conversation is meant would be a guess."""
    rest = dict(rest)
    prompt, messages = rest.pop("prompt", None), rest.pop("messages", None)
    if messages not in (None, [], record["chosen"]):
        raise ValueError("`messages` differs from `chosen`, and both answers are whole conversations: say which "
                         "conversation the row is")
    if isinstance(prompt, str) and prompt.strip():
        texts = [t.get("content", t.get("value")) for t in record["chosen"] if isinstance(t, dict)]
        if prompt not in texts:
            raise ValueError("`prompt` is not a turn of the `chosen` conversation: say which prompt the answers "
                             "answer")
    elif prompt not in (None, ""):
        raise ValueError("`prompt` beside two whole conversations must be the text of their prompt")
    return rest


def _as_given(answer: Any) -> Any:
    """The answer needs no reshaping: it is already in the row's own format."""
    return answer


def _turn(answer: Any, role_key: str, content_key: str, role: str) -> dict:
    if isinstance(answer, str):
        return {role_key: role, content_key: answer}
    return answer


def _turns(answer: Any, role_key: str, content_key: str, role: str) -> list:
    """An answer as a list of turns: a list as given, one turn object, or a string as the assistant's text."""
    if isinstance(answer, list):
        return answer
    return [_turn(answer, role_key, content_key, role)]


def encode_answer(tokenizer, prompt: list[dict], answer: dict, tools, max_length: int,
                  template: ChatTemplate) -> tuple[list[int], list[int], bool]:
    """(prompt ids, answer ids, cut at max_length) of one answer after its prompt, rendered with the template: the
    answer is what the assistant generates (its end of turn included); ValueError when no answer token fits."""
    [sample] = encode_samples(tokenizer, prompt + [answer], max_length, tools, template)
    trained = [i for i, label in enumerate(sample.labels) if label != -100]
    if not trained:
        raise ValueError(f"the prompt fills data.max_length={max_length}: no answer token is left (raise "
                         "data.max_length or shorten the prompt)")
    return sample.input_ids[:trained[0]], sample.input_ids[trained[0]:trained[-1] + 1], sample.truncated


def encode_pair(tokenizer, pair: Pair, max_length: int, template: ChatTemplate) -> tuple[dict, bool]:
    """The pair's token ids ({prompt_ids, chosen_ids, rejected_ids}) and whether an answer was cut at max_length
    (prompt plus answer, each sequence); ValueError when a row cannot train."""
    (prompt, chosen, cut_c), (prompt_r, rejected, cut_r) = (
        encode_answer(tokenizer, pair.prompt, answer, pair.tools, max_length, template)
        for answer in (pair.chosen, pair.rejected))
    if prompt != prompt_r:
        raise ValueError(f"the chat template ({template.name}) tokenises the prompt differently before the two "
                         "answers, so they cannot share it")
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}, cut_c or cut_r


def read_rows(source: str, split: str, accepts, wrong_kind, convert,
              columns: dict | None = None) -> tuple[list, list[str], int, dict]:
    """Every row of a source converted (`convert(record, source, row)` -> (item, ignored fields)); refused rows
    become `file:row: reason` lines. The file's first object row must be of the kind (`accepts`), or the whole file
    is refused with `wrong_kind(keys)`; `columns` maps the file's field names to the format's. Also the row count and
    the fields no format uses (name -> rows)."""
    rows, problems, total, ignored, checked = [], [], 0, {}, False
    for number, value in read_records(source, split):
        total += 1
        try:
            record = object_row(value, columns)
            if not checked and not accepts(record):
                raise UserError(f"{row_name(source, number)}: {wrong_kind(', '.join(sorted(record)) or 'none')}")
            checked = True
            item, extra = convert(record, source, number)
            rows.append(item)
            for name in extra:
                ignored[name] = ignored.get(name, 0) + 1
        except ValueError as err:
            problems.append(f"{row_name(source, number)}: {err}")
    if total == 0:
        raise UserError(f"{source}: no rows")
    return rows, problems, total, ignored


def read_pairs(source: str, split: str, columns: dict | None = None) -> tuple[list[Pair], list[str], int, dict]:
    """Every row of a source as a Pair (see read_rows)."""
    def pair(record, source, number):
        prompt, chosen, rejected, extra = normalise_pair(record)
        return Pair(prompt, chosen, rejected, source, number, row_tools(record)), extra

    return read_rows(source, split, is_preference_record, lambda keys: (
        "the preference objectives (dpo, simpo, orpo) train on preference rows (`prompt` with `chosen` and "
        f"`rejected` answers, or `conversations`/`messages` with them), and this row has keys {keys}; set "
        "objective.name: sft to train on conversations or raw text"), pair, columns)
