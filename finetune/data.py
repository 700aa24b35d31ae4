"""Rows in, token ids with assistant-only labels out.

Reads local JSON/JSONL/Parquet files or hub datasets, detects the row format, normalises every row to chat
`messages`, renders them with a ChatML template and masks the loss to assistant tokens. Malformed rows are
reported with file and row number; the run refuses to start when too many are bad.

Tokenisation happens here rather than inside TRL so that every row's fate is known and reported before
training: TRL would silently drop rows whose assistant tokens all fall past `max_length`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from finetune.errors import UserError

#: ChatML with `{% generation %}` markers around what the assistant must learn to produce: its content and
#: the `<|im_end|>` that ends its turn (a model not trained on it never learns to stop). The markers change
#: nothing when rendering for inference; they only feed `return_assistant_tokens_mask`.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant"}
#: Keys whose presence identifies each format (checked on the first row).
SIGNATURES = {
    "messages": {"messages"},
    "sharegpt": {"conversations"},
    "alpaca": {"instruction", "output"},
    "prompt_completion": {"prompt", "completion"},
}
_SHOWN_PROBLEMS = 10


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    source: str
    row: int  # 1-based: the line of a JSONL file, the index of a JSON array or Parquet/hub row


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    eval_conversations: list[Conversation]
    mean_train_tokens: float
    problems: list[str] = field(default_factory=list)


def build_datasets(
    tokenizer,
    train: str,
    train_split: str,
    eval: str | None,
    eval_split: str,
    eval_fraction: float,
    format: str,
    max_length: int,
    max_bad_fraction: float,
    seed: int,
    log=print,
) -> PreparedData:
    """Load, normalise, split and tokenise; raise UserError when too many rows are bad."""
    from datasets import Dataset

    train_rows, problems, total = load_conversations(train, train_split, format)
    if eval is not None:
        eval_rows, eval_problems, eval_total = load_conversations(eval, eval_split, format)
        problems += eval_problems
        total += eval_total
    else:
        train_rows, eval_rows = split_held_out(train_rows, eval_fraction, seed)

    encoded = {}
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        kept_rows, columns = [], {"input_ids": [], "labels": []}
        for conv in rows:
            ids, labels = encode(tokenizer, conv.messages, max_length)
            if all(label == -100 for label in labels):
                problems.append(f"{conv.source}:{conv.row}: no assistant token left within max_length={max_length}"
                                " (raise data.max_length or shorten the row)")
                continue
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
            kept_rows.append(conv)
        encoded[name] = (kept_rows, columns)

    _check_bad_fraction(problems, total, max_bad_fraction, log)
    train_rows, train_columns = encoded["train"]
    eval_rows, eval_columns = encoded["eval"]
    if not train_rows:
        raise UserError(f"{train}: no usable training rows")
    mean_tokens = sum(map(len, train_columns["input_ids"])) / len(train_rows)
    return PreparedData(
        train=Dataset.from_dict(train_columns),
        eval=Dataset.from_dict(eval_columns) if eval_rows else None,
        eval_conversations=eval_rows,
        mean_train_tokens=mean_tokens,
        problems=problems,
    )


def encode(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside assistant turns), cut to max_length."""
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=CHATML_TEMPLATE,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = list(out["input_ids"])[:max_length]
    mask = list(out["assistant_masks"])[:max_length]
    return ids, [token if keep else -100 for token, keep in zip(ids, mask)]


def load_conversations(source: str, split: str, format: str) -> tuple[list[Conversation], list[str], int]:
    """Every row of a source normalised to messages; malformed rows become problem lines, not exceptions."""
    rows, problems, total = [], [], 0
    fmt = None if format == "auto" else format
    for number, record in read_records(source, split):
        total += 1
        try:
            if isinstance(record, Exception):
                raise ValueError(f"not valid JSON: {record}")
            if not isinstance(record, dict):
                raise ValueError(f"expected an object, got {type(record).__name__}")
            if fmt is None:
                fmt = detect_format(record, f"{source}:{number}")
            rows.append(Conversation(to_messages(record, fmt), source, number))
        except ValueError as err:
            problems.append(f"{source}:{number}: {err}")
    if total == 0:
        raise UserError(f"{source}: no rows")
    return rows, problems, total


def read_records(source: str, split: str) -> Iterator[tuple[int, Any]]:
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as err:
                        yield number, err
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{source}: not valid JSON (line {err.lineno}): {err.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f"{source}: a .json data file must hold a list of rows (or {{\"data\": [...]}})")
        yield from enumerate(data, start=1)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
    else:
        yield from enumerate(_load_hub(source, split), start=1)


def _load_hub(dataset_id: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # network, missing split, missing dataset: all the user's to fix
        raise UserError(
            f"could not load hub dataset `{dataset_id}` split `{split}`: {err}. Offline? Point data.train/data.eval "
            "at a local .jsonl/.json/.parquet file."
        ) from None


def detect_format(record: dict, where: str) -> str:
    matches = [name for name, keys in SIGNATURES.items() if keys <= record.keys()]
    if len(matches) == 1:
        return matches[0]
    keys = ", ".join(sorted(record)) or "none"
    if not matches:
        expected = "; ".join(f"{name}: {', '.join(sorted(keys))}" for name, keys in SIGNATURES.items())
        raise UserError(f"{where}: cannot detect the data format from keys ({keys}). Expected keys - {expected}.")
    raise UserError(f"{where}: keys ({keys}) fit several formats ({', '.join(matches)}); set data.format.")


def to_messages(record: dict, fmt: str) -> list[dict[str, str]]:
    """Normalise one row; ValueError says what is wrong with it."""
    if fmt == "messages":
        messages = [_message(m, "role", "content", {r: r for r in ROLES}) for m in _list(record, "messages")]
    elif fmt == "sharegpt":
        messages = [_message(m, "from", "value", SHAREGPT_ROLES) for m in _list(record, "conversations")]
    elif fmt == "alpaca":
        instruction, output = _text(record, "instruction"), _text(record, "output")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError("`input` must be a string")
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
                    {"role": "assistant", "content": output}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _text(record, "system")})
    elif fmt == "prompt_completion":
        messages = _turns(record, "prompt", "user") + _turns(record, "completion", "assistant")
    else:
        raise ValueError(f"unknown format {fmt}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn")
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("a system message may only come first")
    return messages


def _list(record: dict, key: str) -> list:
    value = record.get(key)
    if not isinstance(value, list) or not value:
        raise ValueError(f"`{key}` must be a non-empty list")
    return value


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"`{key}` must be a non-empty string")
    return value


def _message(item: Any, role_key: str, content_key: str, roles: dict[str, str]) -> dict[str, str]:
    if not isinstance(item, dict):
        raise ValueError(f"each turn must be an object with `{role_key}` and `{content_key}`")
    role = roles.get(item.get(role_key))
    if role is None:
        raise ValueError(f"unknown {role_key} {item.get(role_key)!r} (expected one of {', '.join(roles)})")
    return {"role": role, "content": _text(item, content_key)}


def _turns(record: dict, key: str, role: str) -> list[dict[str, str]]:
    """prompt/completion values are either plain strings or lists of messages (TRL's conversational form)."""
    value = record.get(key)
    if isinstance(value, list):
        return [_message(m, "role", "content", {r: r for r in ROLES}) for m in _list(record, key)]
    return [{"role": role, "content": _text(record, key)}]


def split_held_out(rows: list[Conversation], fraction: float, seed: int):
    """Seeded split; the held-out rows are saved with the run so `finetune eval` reuses exactly them."""
    if fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(rows)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _check_bad_fraction(problems: list[str], total: int, limit: float, log) -> None:
    if not problems:
        return
    shown = "\n".join(f"  - {p}" for p in problems[:_SHOWN_PROBLEMS])
    more = f"\n  ... and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
    summary = f"{len(problems)} of {total} rows unusable ({len(problems) / total:.1%}):\n{shown}{more}"
    if len(problems) / total > limit:
        raise UserError(f"{summary}\nThat is more than data.max_bad_fraction={limit}; fix the data, set "
                        "data.format, or raise data.max_bad_fraction to train on the rest.")
    log(f"[yellow]skipping {summary}[/yellow]")


def save_conversations(rows: list[Conversation], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for conv in rows:
            handle.write(json.dumps({"messages": conv.messages, "source": conv.source, "row": conv.row}) + "\n")


def read_saved_conversations(path: Path) -> list[Conversation]:
    with path.open(encoding="utf-8") as handle:
        return [Conversation(**json.loads(line)) for line in handle if line.strip()]
