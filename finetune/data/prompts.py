"""Prompt rows for online RL (objective grpo): the question the policy answers, and every other field of the row
for the reward functions.

A row gives its prompt as TRL's `prompt` (a string, or a message list ending in a user turn), as `messages` /
`conversations` ending in a user turn, or as Alpaca's `instruction` (with `input`, `system`, `history`); a file's
own field names map to these with `data.sources: [{path: ..., columns: {prompt: question}}]`. Each prompt is checked
exactly as an SFT row is (roles, tools, refused fields: finetune.data.formats) and rendered with the run's chat
template and its generation prompt, so the policy answers in the turn format it will be used in. Everything else in
the row (`answer`, `solution`, `tests`, Alpaca's `output`, ...) reaches the reward functions under its own name.

Prompts are not cached (finetune.data.cache): rendering them is one template call per row, seconds for 100k rows,
while the cost of a GRPO step is generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.formats import MULTIMODAL, normalise, present, row_tools
from finetune.data.preference.pairs import SavedRow, read_rows
from finetune.data.preference.prepare import PreparedPairs
from finetune.data.rows import check_bad_fraction, ignored_line, split_held_out
from finetune.data.sources import row_name
from finetune.data.template import ChatTemplate, fit_messages, render
from finetune.errors import UserError
from finetune.paths import write_atomic

#: The fields that make up a prompt in each shape a row may have; everything else is a column for the rewards.
PROMPT_FIELDS = {"prompt": {"prompt", "system", "tools"}, "messages": {"messages", "system", "tools"},
                 "conversations": {"conversations", "system", "tools"},
                 "instruction": {"instruction", "input", "system", "history"}}
#: Row fields holding media, which a text-only policy cannot see: refused, as for SFT rows.
MEDIA_FIELDS = {"images", "image", "audios", "audio", "videos", "video"}
#: The column naming each row's origin (`file:row`), which reward errors and completions.jsonl quote.
ORIGIN = "source_row"
#: Stands in for the answer still to come, so a prompt is checked by the same code as a conversation.
_PENDING = "(the answer the policy generates)"


@dataclass
class PromptRow(SavedRow):
    """One prompt, normalised, with the row's other fields."""

    prompt: list[dict[str, Any]]  # messages ending in a user turn
    columns: dict[str, Any]
    source: str
    row: int
    tools: list[dict] | None = None


@dataclass
class PreparedPrompts(PreparedPairs):
    """What the grpo objective trains on: `train` holds the rendered prompt, `source_row` and the reward columns;
    `eval` stays None, since held-out prompts are scored by `finetune eval` after training, not during it."""

    columns: list[str] = field(default_factory=list)  # the reward columns, by name
    first_rows: list[dict] = field(default_factory=list)  # as TRL passes them to the rewards, for the start check

    @property
    def held_out_prompts(self) -> list[PromptRow]:
        """The held-out prompts (the start summary counts them)."""
        return self.held_out

    def save_held_out(self, path: Path) -> None:
        save_prompts(self.held_out, path)


def prompt_shape(record: dict) -> str | None:
    return next((shape for shape in PROMPT_FIELDS if present(record.get(shape))), None)


def normalise_prompt(record: dict) -> tuple[list[dict], dict]:
    """(prompt messages, reward columns) of one row (no field is ignored: the rewards get every one that is not the
    prompt's); ValueError says why it is refused."""
    shape = prompt_shape(record)
    if shape is None:
        raise ValueError("no prompt: give `prompt`, `messages` (ending in a user turn) or `instruction`")
    columns = {k: v for k, v in record.items() if k not in PROMPT_FIELDS[shape]}
    media = sorted(k for k in columns.keys() & MEDIA_FIELDS if present(columns[k]))
    if media:
        raise ValueError(f"`{media[0]}`: {MULTIMODAL}")
    rest = {k: v for k, v in record.items() if k in PROMPT_FIELDS[shape]}
    pending = {"role": "assistant", "content": _PENDING}
    if shape == "instruction":
        messages, _ = normalise({**rest, "output": _PENDING}, "alpaca")
    else:
        turns = rest[shape]
        if isinstance(turns, str):
            if shape != "prompt":
                raise ValueError(f"`{shape}` is a string: give a list of turns")
            turns = [{"role": "user", "content": turns}]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"`{shape}` is neither a string nor a list of turns")
        last = turns[-1] if isinstance(turns[-1], dict) else {}
        if last.get("role", last.get("from")) in ("assistant", "gpt"):
            raise ValueError(f"`{shape}` ends with an assistant turn, and GRPO generates the answer: end the prompt "
                             "with the user's turn and keep a reference answer in a column of its own (`answer`) for "
                             "the rewards")
        key, fmt = ("conversations", "sharegpt") if shape == "conversations" else ("messages", "messages")
        if fmt == "sharegpt":
            pending = {"from": "gpt", "value": _PENDING}
        messages, _ = normalise({**{k: v for k, v in rest.items() if k != shape}, key: turns + [pending]}, fmt)
    return messages[:-1], columns


def read_prompts(source: str, split: str, columns: dict | None = None) -> tuple[list[PromptRow], list[str], int,
                                                                                  dict]:
    """Every row of a source as a PromptRow (see finetune.data.preference.pairs.read_rows)."""
    def convert(record, source, number):
        prompt, rest = normalise_prompt(record)
        return PromptRow(prompt, rest, source, number, row_tools(record)), set()

    return read_rows(source, split, lambda record: prompt_shape(record) is not None, lambda keys: (
        "objective grpo trains on prompts (`prompt`, `messages` ending in a user turn, or `instruction`) and this "
        f"row has keys {keys}; map a field of your own with data.sources: [{{path: ..., columns: {{prompt: "
        "question}}]"), convert, columns)


def build_prompts(tokenizer, template: ChatTemplate, train: str, train_split: str, eval: str | None,
                  eval_split: str, eval_fraction: float, prompt_limit: int, max_bad_fraction: float, seed: int,
                  log=print, columns: dict | None = None, completion_limit: int = 0) -> PreparedPrompts:
    """Read, split (the seeded draw SFT uses) and render prompts. A prompt longer than `prompt_limit` tokens is
    refused, not cut: cutting a question changes what its reward checks."""
    import datasets

    rows, problems, total, ignored = read_prompts(train, train_split, columns)
    lines = [ignored_line(train, ignored)]
    if eval is not None:
        held, held_problems, held_total, _ = read_prompts(eval, eval_split)
        problems, total = problems + held_problems, total + held_total
    else:
        rows, held = split_held_out(rows, eval_fraction, seed)
    records, lengths = [], []
    for row in rows:
        try:
            text = rendered_prompt(tokenizer, template, row)
        except ValueError as err:
            problems.append(f"{row_name(row.source, row.row)}: {err}")
            continue
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if length > prompt_limit:
            problems.append(f"{row_name(row.source, row.row)}: the prompt is {length} tokens, more than the "
                            f"{prompt_limit} left for it (data.max_length minus objective.max_completion_length)")
            continue
        records.append({"prompt": text, ORIGIN: row_name(row.source, row.row), **row.columns})
        lengths.append(length)
    for line in lines:
        if line:
            log(line)
    check_bad_fraction(problems, total, max_bad_fraction, log)
    if not records:
        raise UserError(f"{train}: no usable prompts")
    names = sorted({k for r in records for k in r} - {"prompt", ORIGIN})
    try:
        dataset = datasets.Dataset.from_list(records)
    except (TypeError, ValueError) as err:  # pyarrow's ArrowInvalid/ArrowTypeError are ValueError/TypeError
        raise UserError(f"{train}: the columns passed to the rewards ({', '.join(names)}) must hold one type each "
                        f"across rows (a number in one row and text in another cannot be one column): {err}") from None
    # A completion's tokens are known only as it is generated: its limit stands in for them (an upper bound).
    mean = sum(lengths) / len(lengths) + completion_limit
    return PreparedPrompts(train=dataset, eval=None, held_out=held, mean_train_tokens=mean,
                           columns=names, first_rows=records[:4], problems=problems, rows_read=total,
                           ignored_lines=[line for line in lines if line],
                           mix=[{"source": train, "rows": len(records)}])


def rendered_prompt(tokenizer, template: ChatTemplate, row: PromptRow) -> str:
    """The prompt as the policy sees it: the run's template with its generation prompt (training and eval alike)."""
    return render(tokenizer, template.text_for(row.tools), fit_messages(template, row.prompt), row.tools,
                  generation_prompt=True)


def save_prompts(rows: list[PromptRow], path: Path) -> None:
    """A run's held-out prompts with their reward columns (held_out.jsonl), for `finetune eval`."""
    import json

    write_atomic(path, "".join(json.dumps({**row.to_json(), "kind": "prompt"}, default=str) + "\n" for row in rows))


def read_saved_prompts(path: Path) -> list[PromptRow] | None:
    """A run's held-out prompts, or None when its held_out.jsonl holds something else (conversations, pairs)."""
    import json

    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    if not rows or rows[0].get("kind") != "prompt":
        return None
    return [PromptRow(**{k: v for k, v in r.items() if k != "kind"}) for r in rows]
