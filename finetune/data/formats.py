"""Row formats: which one a file uses, and each row normalised to chat messages.

Every field a format defines is honoured or the row is refused with the reason: nothing a row says about what to
train is dropped silently. Fields no format defines and finetune knows no meaning for (ids, sources, timestamps)
are ignored; those with a value are returned so the caller can list them once per file (null or empty values, as
in exports and merged `datasets` schemas, carry nothing and are not listed).
"""

from __future__ import annotations

import re
from typing import Any

from finetune.data.mixture import rename
from finetune.data.tools import (
    name_results,
    openai_calls,
    parse_tools,
    result_text,
    sharegpt_calls,
)
from finetune.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
OPENAI_ROLES = {r: r for r in ROLES}
#: LLaMA-Factory's ShareGPT roles: `function_call` is the assistant calling tools, `observation` their result.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "function_call": "assistant", "observation": "tool"}
#: Keys whose presence identifies each format (checked on the first row).
SIGNATURES = {
    "messages": {"messages"},
    "sharegpt": {"conversations"},
    "alpaca": {"instruction", "output"},
    "prompt_completion": {"prompt", "completion"},
    "text": {"text"},  # raw text (finetune.data.text): every token trains
}
#: Optional row fields each format honours. `history` (earlier [instruction, response] rounds) is LLaMA-Factory's
#: Alpaca convention (github.com/hiyouga/LLaMA-Factory, data/README.md); a row-level `system` is honoured everywhere.
OPTIONAL = {"messages": {"system", "tools"}, "sharegpt": {"system", "tools"}, "alpaca": {"input", "system", "history"},
            "prompt_completion": {"system"}, "text": set()}
#: Formats whose every field is a string, so a CSV/TSV column can hold them.
FLAT_FORMATS = ("alpaca", "prompt_completion", "text")

LEGACY_FUNCTIONS = ("OpenAI's deprecated function-calling fields are not supported; use `tools`, assistant "
                    "`tool_calls` and `role: tool` results")
MULTIMODAL = ("multimodal rows are not supported: this is a text-only model, which would drop the media (images "
              "train on a vision-language model: model.name_or_path a Qwen2-VL, SmolVLM/Idefics3, Gemma-3 or LLaVA "
              "checkpoint)")
PAIRED = ("preference data (a `chosen` and a `rejected` answer) in a file of conversations: SFT cannot honour "
          "it; train a file of pairs with objective.name: dpo")
LABELLED = ("a `label` field (KTO data marks each answer as good or bad with it): SFT cannot honour it; train "
            "such rows with objective.name: kto, or drop the field if it says nothing about the answer's quality")
REASONING = ("name the reasoning `reasoning_content`, the field chat templates read (Qwen3's renders it; a template "
             "without a place for it gets the row refused)")
#: Row fields that change what is trained but cannot be honoured yet: a row carrying one (non-empty) is refused.
REFUSED = {
    "functions": LEGACY_FUNCTIONS,
    **dict.fromkeys(("images", "image", "audios", "audio", "videos", "video"), MULTIMODAL),
    "chosen": PAIRED, "rejected": PAIRED, "kto_tag": LABELLED,
    "weight": "a row-level `weight` (sample weighting) is not supported; every row counts the same",
}
#: Turn fields that read as saying whether the turn is trained, in conventions finetune cannot honour: refused rather
#: than ignored, since ignoring one could train a turn the data marks as not trained (or the reverse).
MASKING = ("looks like it says whether this turn is trained, which finetune cannot honour; use `weight` (or "
           "`loss_weight`): 0 = context only, 1 = trained")
#: Turn fields refused the same way (OpenAI's tool fields; a speaker `name` the template cannot show).
REFUSED_TURN = {
    "function_call": LEGACY_FUNCTIONS,
    "audio": MULTIMODAL, "images": MULTIMODAL,
    "name": "a speaker `name` is not supported (the ChatML template cannot show it)",
    "reasoning": REASONING, "thinking": REASONING,
    **dict.fromkeys(("mask", "masked", "loss_mask", "train", "trainable", "loss", "ignore", "ignored",
                     "ignore_loss", "no_loss"), MASKING),
}
#: Per-turn training weights: OpenAI's `weight` and LLaMA-Factory v1's `loss_weight` (0.0 or 1.0), honoured alike.
WEIGHT_FIELDS = ("weight", "loss_weight")
#: Roles finetune cannot honour: OpenAI's deprecated `function` results, Llama 3.1's code-interpreter `ipython`.
REFUSED_ROLES = {"function": LEGACY_FUNCTIONS,
                 "ipython": "`ipython` (code interpreter) turns are not supported; tool results are `role: tool`"}
#: Turn fields each kind of turn carries besides its role and content.
TURN_FIELDS = {"assistant": {"weight", "tool_calls", "reasoning_content"}, "tool": {"tool_call_id", "name"}}
MEDIA_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file", "input_file"}
#: Media placeholders in text. The rule: a row with media *fields* (`images`, `videos`, `audios`, ...) or media
#: content parts is refused whatever its text says. In text alone, `<video>` and `<audio>` are HTML5 elements
#: ("Use the <video> element...") and train as text. The bare token `<image>` (LLaVA's and LLaMA-Factory's image
#: placeholder; HTML has no such element) is refused as a placeholder, unless the row also holds an HTML/XML
#: closing tag (`</...>`), which makes it markup (e.g. SVG or XML that talks about an `<image>` element).
PLACEHOLDER = "<image>"
CLOSING_TAG = re.compile(r"</[A-Za-z][\w:.-]*\s*>")


def detect_format(record: dict, where: str) -> str:
    matches = [name for name, keys in SIGNATURES.items() if keys <= record.keys()]
    if len(matches) == 1:
        return matches[0]
    keys = ", ".join(sorted(record)) or "none"
    if not matches:
        expected = "; ".join(f"{name}: {', '.join(sorted(keys))}" for name, keys in SIGNATURES.items())
        texts = [k for k, v in record.items() if isinstance(v, str) and len(v) > 0]
        hint = (f" A field of raw documents under another name: data.text_column: {texts[0]}." if len(texts) == 1
                else "")
        raise UserError(f"{where}: cannot detect the data format from keys ({keys}). Expected keys - "
                        f"{expected}.{hint}")
    if "text" in matches:  # datasets often keep a rendered `text` beside the conversation it came from
        other = next(name for name in matches if name != "text")
        raise UserError(f"{where}: the row has a `text` field beside {other} fields ({keys}), so it could be raw text "
                        f"(every token trained) or {other} rows (only the answers trained); set data.format: text or "
                        f"data.format: {other} (the other field is then listed as ignored).")
    raise UserError(f"{where}: keys ({keys}) fit several formats ({', '.join(matches)}); set data.format.")


def first_row_format(record: dict, format: str | None, where: str) -> str:
    """The format of a file from its first row; preference data is refused here, once for the whole file."""
    refuse_preference_data(record, where)
    return format or detect_format(record, where)


def refuse_preference_data(record: dict, where: str) -> None:
    keys = {key for key, value in record.items() if present(value)}  # null columns of a merged schema say nothing
    if {"chosen", "rejected"} <= keys:
        shape = next((f"with `{k}`" for k in ("prompt", "conversations", "messages", "instruction") if k in keys),
                     "with the prompt inside each answer")
        raise UserError(
            f"{where}: this is preference data ({shape}, a preferred `chosen` and a `rejected` answer per row), "
            "and the recipe's objective is supervised fine-tuning (sft). Set `objective: {name: dpo}` to train on "
            "the pairs; to fine-tune on the preferred answers alone, convert each row to `messages` ending with its "
            "`chosen` answer.")
    kto = "kto_tag" in keys or (isinstance(record.get("label"), bool)
                                and (SIGNATURES["prompt_completion"] <= keys or "messages" in keys))
    if kto:
        raise UserError(
            f"{where}: this is unpaired preference data (KTO: a `label` per row marks its completion as desirable "
            "or not), and the recipe's objective is supervised fine-tuning (sft), which would also teach the answers "
            "marked bad. Set `objective: {name: kto}` to train on the labels; to fine-tune on the good answers "
            "alone, keep only the rows labelled true and drop the `label` field.")


def flat_format_problem(columns: list[str]) -> str | None:
    """Why columns of a CSV/TSV file fit no format a flat table can hold, or None when they fit."""
    if any(SIGNATURES[f] <= set(columns) for f in FLAT_FORMATS) or {"chosen", "rejected"} <= set(columns):
        return None  # preference columns pass here so the first row is refused with what the data is
    return (f"columns ({', '.join(columns) or 'none'}) fit no format a CSV/TSV file can hold: instruction and "
            "output (optional input, system) for Alpaca rows, prompt and completion, or text (raw text)")


def row_document(record: dict) -> tuple[str, set[str]]:
    """A text row's document and its ignored fields; ValueError refuses the row (finetune.data.text.EmptyDocument,
    a ValueError, skips it)."""
    from finetune.data.text import EmptyDocument

    if "text" not in record:
        other = next((name for name, keys in SIGNATURES.items() if keys <= record.keys()), None)
        raise ValueError(f"a {other} row in a text file (one format per file)" if other else "no `text` field")
    extra = record.keys() - {"text"}
    for key in extra & REFUSED.keys():
        if present(record[key]):
            raise ValueError(f"`{key}`: {REFUSED[key]}")
    text = record["text"]
    if text is None or (isinstance(text, str) and not text.strip()):
        raise EmptyDocument("empty document")
    if not isinstance(text, str):
        raise ValueError(f"`text` must be a string, got {type(text).__name__}")
    return text, {key for key in extra if present(record[key])}


def normalise(record: dict, fmt: str, media: bool = False) -> tuple[list[dict[str, Any]], set[str]]:
    """One row as messages, and the names of its ignored fields; ValueError says why a row is refused. `media`: the
    row's images were taken out (finetune.data.images) and `<image>` placeholders mark where they sit."""
    if fmt not in SIGNATURES or fmt == "text":
        raise ValueError(f"unknown format {fmt}" if fmt != "text" else "text rows have no messages (row_document)")
    if not SIGNATURES[fmt] <= record.keys():
        other = next((name for name, keys in SIGNATURES.items() if keys <= record.keys()), None)
        if other:
            raise ValueError(f"a {other} row in a {fmt} file (the format comes from the first row or data.format; "
                             "one format per file)")
    extra = record.keys() - SIGNATURES[fmt] - OPTIONAL[fmt]
    for key in extra & REFUSED.keys():
        if present(record[key]):
            raise ValueError(f"`{key}`: {REFUSED[key]}")
    # Only a boolean `label` marks an answer good or bad (KTO); any other `label` (a class, a topic) is just a field.
    if isinstance(record.get("label"), bool):
        raise ValueError(f"`label`: {LABELLED}")
    ignored = {key for key in extra - REFUSED.keys() if present(record[key])}
    messages = _NORMALISERS[fmt](record, ignored)
    system = _optional_text(record, "system")
    if system is not None:
        if messages[0]["role"] == "system":
            raise ValueError("both a row-level `system` and a system turn; keep one")
        messages.insert(0, {"role": "system", "content": system})
    _check_conversation(messages, media)
    return name_results(messages), ignored


def object_row(value: Any, columns: dict[str, str] | None = None) -> dict:
    """A read row as an object with the format's field names (`columns` maps them from the file's); ValueError for a
    row that did not parse or is not an object."""
    if isinstance(value, Exception):
        raise ValueError(f"not valid JSON: {value}")
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    return rename(dict(value), columns or {})


def row_messages(record: dict, fmt: str, media: bool = False) -> tuple[list[dict[str, Any]], set[str],
                                                                     list[dict] | None]:
    """(messages, ignored fields, tools) of an object row; ValueError says why the row is refused."""
    messages, ignored = normalise(record, fmt, media)
    return messages, ignored, row_tools(record)


def to_messages(record: dict, fmt: str) -> list[dict[str, Any]]:
    """Normalise one row; ValueError says what is wrong with it."""
    return normalise(record, fmt)[0]


def _from_messages(record: dict, ignored: set[str]) -> list[dict]:
    return [_turn(m, n, "role", "content", OPENAI_ROLES, ignored, "messages")
            for n, m in enumerate(_list(record, "messages"), start=1)]


def _from_sharegpt(record: dict, ignored: set[str]) -> list[dict]:
    return [_turn(m, n, "from", "value", SHAREGPT_ROLES, ignored, "conversations")
            for n, m in enumerate(_list(record, "conversations"), start=1)]


def _from_alpaca(record: dict, ignored: set[str]) -> list[dict]:
    instruction, output = _text(record, "instruction"), record.get("output")
    if isinstance(output, list):
        raise ValueError("`output` is a list: several ranked answers are preference data; finetune trains SFT "
                         "only today (one `output` string per row)")
    output = _text(record, "output")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise ValueError("`input` must be a string")
    if not isinstance(record.get("history") or [], list):
        raise ValueError("`history` must be a list of [instruction, response] pairs")
    messages = []
    # Earlier rounds come before the current one and their answers are trained like any assistant turn, as with
    # LLaMA-Factory's default (mask_history: false).
    for number, pair in enumerate(record.get("history") or [], start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_is_text(p) for p in pair)):
            raise ValueError(f"`history` item {number} must be an [instruction, response] pair of non-empty strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_prompt_completion(record: dict, ignored: set[str]) -> list[dict]:
    """prompt/completion values are plain strings or lists of messages (TRL's conversational form)."""
    messages = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        if isinstance(record.get(key), list):
            messages += [_turn(m, n, "role", "content", OPENAI_ROLES, ignored, key)
                         for n, m in enumerate(_list(record, key), start=1)]
        else:
            messages.append({"role": role, "content": _text(record, key)})
    return messages


_NORMALISERS = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
                "prompt_completion": _from_prompt_completion}


def _turn(item: Any, number: int, role_key: str, content_key: str, roles: dict[str, str], ignored: set[str],
          field: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError(f"each turn must be an object with `{role_key}` and `{content_key}`")
    given = item.get(role_key)
    if isinstance(given, str) and given in REFUSED_ROLES:
        raise ValueError(f"`{field}` turn {number} has {role_key} `{given}`: {REFUSED_ROLES[given]}")
    role = roles.get(given) if isinstance(given, str) else None
    if role is None:
        raise ValueError(f"unknown {role_key} {given!r} (expected one of {', '.join(roles)})")
    where = f"`{field}` turn {number}"
    if len(item) == 2 and content_key in item:  # most turns: a role and a content, nothing else to check
        content = item[content_key]
        if isinstance(content, str) and content.strip() and role != "tool" and given != "function_call":
            return {"role": role, "content": content}
    extra = item.keys() - {role_key, content_key, *WEIGHT_FIELDS} - TURN_FIELDS.get(role, set())
    if extra:
        for key in extra & REFUSED_TURN.keys():
            if present(item[key]):
                raise ValueError(f"`{field}` turn {number} has `{key}`: {REFUSED_TURN[key]}")
        ignored.update(f"{field}[].{k}" for k in extra - REFUSED_TURN.keys() if present(item[k]))
    message = _tool_turn(item, given, role, content_key, where)
    if message is None:
        message = {"role": role, "content": _content(item.get(content_key), content_key, where)}
    if role == "assistant" and present(item.get("reasoning_content")):
        # Shown by the template or the row is refused (finetune.data.template checks every trained span).
        message["reasoning_content"] = _content(item["reasoning_content"], "reasoning_content", where)
    weights = [key for key in WEIGHT_FIELDS if item.get(key) is not None]
    if len(weights) == 2 and item["weight"] != item["loss_weight"]:
        raise ValueError(f"{where}: `weight` {item['weight']!r} and `loss_weight` {item['loss_weight']!r} disagree")
    if weights and not _trained(item[weights[0]], role, where, weights[0]) and role == "assistant":
        message["weight"] = 0  # rendered like any assistant turn, outside the loss (see template.py)
    return message


def _tool_turn(item: dict, given: str, role: str, content_key: str, where: str) -> dict | None:
    """A tool call or tool result in the one internal shape (finetune.data.tools); None for any other turn."""
    if given == "function_call":  # ShareGPT: the value is the call itself
        return {"role": "assistant", "content": "", "tool_calls": sharegpt_calls(item.get(content_key), where)}
    if role == "tool":
        message = {"role": "tool", "content": result_text(item.get(content_key), where)}
        message.update({k: item[k] for k in ("tool_call_id", "name") if isinstance(item.get(k), str) and item[k]})
        return message
    if role == "assistant" and present(item.get("tool_calls")):
        content = item.get(content_key)
        text = "" if content is None or content == "" else _content(content, content_key, where)
        return {"role": "assistant", "content": text, "tool_calls": openai_calls(item["tool_calls"], where)}
    return None


def row_tools(record: dict) -> list[dict] | None:
    """The row's tool schemas (`tools`, a list or its JSON text), or None; ValueError when malformed.

    No tools (null, "", [], or the JSON text "[]", as in glaive_toolcall_en_demo's plain chats) is None: the row is a
    plain chat."""
    return (parse_tools(record["tools"]) or None) if present(record.get("tools")) else None


def _trained(weight: Any, role: str, where: str, key: str = "weight") -> bool:
    """OpenAI's per-turn `weight` (or LLaMA-Factory v1's `loss_weight`): 0 keeps an assistant turn as context only,
    1 (or absent) trains it."""
    if weight is None:
        return True
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise ValueError(f"{where}: `{key}` {weight!r} is not supported; use 0 (context only) or 1 (trained)")
    if weight == 1 and role != "assistant":
        raise ValueError(f"{where}: `{key}` 1 on a {role} turn; only assistant turns are trained")
    return weight == 1


def _content(value: Any, key: str, where: str) -> str:
    if isinstance(value, list):
        value = _join_parts(value, where)
    if not _is_text(value):
        raise ValueError(f"`{key}` must be a non-empty string")
    return value


def _join_parts(parts: list, where: str) -> str:
    """OpenAI-style content parts: text parts are concatenated as chat templates do (e.g. Qwen2-VL's); media refused."""
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in MEDIA_PARTS:
            raise ValueError(f"{where} has {'an' if kind[:1] in 'aeiou' else 'a'} `{kind}` content part: {MULTIMODAL}")
        else:
            raise ValueError(f"{where}: content parts must be {{\"type\": \"text\", \"text\": ...}} "
                             f"(got {str(part)[:60]})")
    return "".join(texts)


def _check_conversation(messages: list[dict], media: bool = False) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn")
    if not any(m["role"] == "assistant" and "weight" not in m for m in messages):
        raise ValueError("every assistant turn has `weight` 0: nothing to train")
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("a system message may only come first")
    for number, message in enumerate(messages, start=1):
        before = messages[number - 2] if number > 1 else {}
        if message["role"] == "tool" and not (before.get("tool_calls") or before.get("role") == "tool"):
            raise ValueError(f"turn {number} is a tool result that follows no tool call")
    placeholder = next((n for n, m in enumerate(messages, start=1) if PLACEHOLDER in m["content"]), None)
    if placeholder and not media and not any(CLOSING_TAG.search(m["content"]) for m in messages):
        raise ValueError(f"a `{PLACEHOLDER}` placeholder in turn {placeholder}: {MULTIMODAL} (markup with its "
                         "closing tags is text)")


def present(value: Any) -> bool:
    """Null or empty values say nothing (exports often carry `tool_calls: null`, `images: []`)."""
    return value is not None and not (isinstance(value, (str, list, dict)) and not value)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _list(record: dict, key: str) -> list:
    value = record.get(key)
    if not isinstance(value, list) or not value:
        raise ValueError(f"`{key}` must be a non-empty list")
    return value


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not _is_text(value):
        raise ValueError(f"`{key}` must be a non-empty string")
    return value


def _optional_text(record: dict, key: str) -> str | None:
    value = record.get(key)
    return None if value is None or value == "" else _text(record, key)
