"""Chat templates: which one a run trains with, the token that ends an assistant turn, and exact assistant labels.

Masks work for any template, with or without `{% generation %}` markers, by rendering prefixes of the conversation:
for assistant turn k, `messages[:k]` with the generation prompt is the text a runtime hands the model before it
answers, and `messages[:k+1]` is the text with the answer. What the second adds after their common prefix, up to
and including the template's end-of-turn token, is exactly what the model must generate: that is trained, and
nothing else (system, user and tool turns, role headers, generation prompts, text after the end-of-turn token).

The spans are located in one rendering of the whole conversation, which holds when each `messages[:k+1]` rendering
is a prefix of it (the concatenation property). Templates that rewrite earlier turns break it (reasoning models
drop the thinking of past turns, so an answer is rendered differently once the conversation goes on). Such a row
becomes one sample per assistant turn: `messages[:k+1]` rendered on its own, turn k trained, the earlier turns as
the template shows them at that position. Each answer is then trained in exactly the context a runtime gives it.

Some templates render the prompt differently once an answer follows it (Mistral-7B-Instruct-v0.3 and Mistral-Nemo show
the system prompt only when the last user turn is the last message, i.e. only in the generation prompt). Then turn k
trains as the runtime sees it: `messages[:k]` with the generation prompt, followed by what the template renders for
that answer after its generation prompt in a one-question conversation.

Nothing the row says may vanish: every system, user and tool text must appear in what is trained, and every trained
answer (its `reasoning_content` too) inside its trained span. A template that drops text (an old Mistral template
without a system branch, DeepSeek-R1's, which strips `<think>...</think>` from every answer) gets the row refused.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

#: ChatML, with the Hermes tool-calling convention Qwen2.5 uses (tools listed in the system turn, calls as
#: `<tool_call>{json}</tool_call>`, results in a user turn as `<tool_response>`), which vLLM's `hermes` parser and
#: Ollama read. `{% generation %}` marks what the assistant produces (content, calls, `<|im_end|>`) for callers of
#: `return_assistant_tokens_mask` (TRL's assistant_only_loss); finetune's own masks do not need the markers. An
#: assistant turn with `weight` 0 (OpenAI's "context only") renders byte for byte the same, outside the markers.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools and loop.first %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set ns = namespace(body=message['content'] if message['content'] is defined else '') %}"
    "{%- if message['tool_calls'] is defined %}{%- for call in message['tool_calls'] %}"
    "{%- set call = call['function'] if call['function'] is defined else call %}"
    "{%- set ns.body = ns.body + ('\n' if ns.body else '') + '<tool_call>\n{\"name\": \"' + call['name'] + "
    "'\", \"arguments\": ' + (call['arguments'] | tojson) + '}\n</tool_call>' %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if message['weight'] is not defined or message['weight'] != 0 %}"
    "{% generation %}{{- ns.body + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}{{- ns.body + '<|im_end|>\n' }}{%- endif %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_PROBE = "PROBE-ANSWER-7f3a"
_PROBE_SYSTEM = "PROBE-SYSTEM-5c1e"
_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe", "description": "d",
                                                  "parameters": {"type": "object", "properties": {}}}}]
THINK_TAG = re.compile(r"</?think>")


class Sample(NamedTuple):
    input_ids: list[int]
    labels: list[int]  # -100 where no loss
    truncated: bool  # the rendered row was longer than max_length and was cut at the end


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's chat template as finetune trains with it."""

    text: str
    name: str  # "ChatML", "the model's own", or a .jinja path
    end_of_turn: str  # the special token that ends an assistant turn
    end_of_turn_id: int
    accepts_system: bool
    fold_system: bool = False
    #: A tokenizer's named `tool_use` template (Hermes-2-Pro, Command-R): used for rows with tools, as
    #: `apply_chat_template` does, and saved with the run's tokenizer next to the default one.
    tool_text: str | None = None

    @property
    def supports_tools(self) -> bool:
        return self.tool_text is not None or ("tools" in self.text and "tool_calls" in self.text)

    def text_for(self, tools: list | None) -> str:
        return self.tool_text if tools and self.tool_text is not None else self.text


def named_templates(value) -> tuple[str | None, str | None]:
    """(default, tool_use) of a tokenizer's chat_template: a string, or a dict of named templates (the list form of
    tokenizer_config.json; transformers picks `tool_use` when tools are passed, else `default`)."""
    if isinstance(value, str):
        return value, None
    if not isinstance(value, dict) or not value:
        return None, None
    default = value.get("default") or (next(iter(value.values())) if len(value) == 1 else None)
    if default is None:
        raise ValueError(f"the tokenizer has named chat templates ({', '.join(value)}) and none is `default`; point "
                         "data.chat_template at the one to train as a .jinja file")
    return default, value.get("tool_use")


def choose_template(tokenizer, choice: str) -> tuple[str | dict, str, list[str]]:
    """(template text, or the tokenizer's named templates; its name; ChatML tokens to add) for
    `data.chat_template`: auto, chatml, model or a path."""
    own = tokenizer.chat_template if named_templates(tokenizer.chat_template)[0] else None
    if choice == "auto":
        choice = "model" if own else "chatml"
    if choice == "model":
        if not own:
            raise ValueError("data.chat_template is `model`, but this tokenizer has no chat template; use `chatml` "
                             "(or `auto`, which picks ChatML for base models) or a .jinja file")
        return own, "the model's own", []
    if choice == "chatml":
        # Missing markers are added; ones the tokenizer has as ordinary text tokens become special (same ids), so
        # that <|im_end|> can be a stop token and decoding drops it.
        special = {*tokenizer.all_special_tokens,
                   *(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)}
        return CHATML_TEMPLATE, "ChatML", [t for t in CHATML_TOKENS if t not in special]
    path = os.path.expanduser(choice)
    if not os.path.isfile(path):
        raise ValueError(f"data.chat_template: `{choice}` is not auto, chatml, model or an existing .jinja file")
    with open(path, encoding="utf-8") as handle:
        return handle.read(), choice, []


def chat_template(tokenizer, name: str | None = None, fold_system: bool = False) -> ChatTemplate:
    """The tokenizer's template (ChatML when it has none) with its end-of-turn token; ValueError says what is wrong."""
    if not getattr(tokenizer, "is_fast", True):
        raise ValueError("exact assistant masks need a fast (Rust `tokenizers`) tokenizer, for character offsets; "
                         "this one is a slow Python tokenizer (save a fast one with transformers and point at it)")
    text, tool_text = named_templates(tokenizer.chat_template)
    text = text or CHATML_TEMPLATE
    name = name or ("ChatML" if text == CHATML_TEMPLATE else "the model's own")
    eot = _end_of_turn(tokenizer, text, name)
    if tool_text is not None and _end_of_turn(tokenizer, tool_text, f"{name}, tool_use", _PROBE_TOOLS) != eot:
        raise ValueError(f"chat template ({name}): its `tool_use` template ends a turn with another token than its "
                         f"default one ({eot}); one run trains one end-of-turn token")
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    if tokenizer(eot, add_special_tokens=False)["input_ids"] != [eot_id]:
        raise ValueError(f"chat template ({name}): its end-of-turn token {eot!r} does not encode as one token")
    try:  # Gemma's and Mistral-v0.2's templates raise on a system turn; some older ones drop it without a word
        shown = render(tokenizer, text, [{"role": "system", "content": _PROBE_SYSTEM},
                                         {"role": "user", "content": "Hi"}], generation_prompt=True)
        accepts_system = _PROBE_SYSTEM in shown
    except Exception:
        accepts_system = False
    return ChatTemplate(text, name, eot, eot_id, accepts_system, fold_system, tool_text)


def _end_of_turn(tokenizer, text: str, name: str, tools: list | None = None) -> str:
    """The special token the template puts right after an answer (whitespace between them allowed: deepseek-coder
    renders `answer\n<|EOT|>`)."""
    try:
        probe = render(tokenizer, text, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}],
                       tools)
    except Exception as err:
        raise ValueError(f"chat template ({name}) cannot render a user turn and an answer: {err}") from None
    if _PROBE not in probe:
        raise ValueError(f"chat template ({name}) does not show an assistant answer it is given")
    rest = probe[probe.rfind(_PROBE) + len(_PROBE):]
    after = rest.lstrip()
    added = tokenizer.added_tokens_decoder.values()
    specials = sorted({*tokenizer.all_special_tokens, *(t.content for t in added if t.special)}, key=len, reverse=True)
    eot = next((token for token in specials if token and after.startswith(token)), None)
    if eot is not None:
        return eot
    if not rest:
        raise ValueError(
            f"chat template ({name}) renders nothing after an assistant answer, so no token ends a turn (GLM-style "
            "templates stop on the next turn's header): a model trained on it cannot learn to stop. Use a .jinja "
            "template whose answers end with a special token, or data.chat_template: chatml.")
    plain = next((t.content for t in sorted(added, key=lambda t: -len(t.content)) if after.startswith(t.content)),
                 None)
    if plain is not None:
        raise ValueError(
            f"chat template ({name}) ends an assistant turn with {plain!r}, which this tokenizer has as an ordinary "
            "added token, not a special one: generation_config cannot name it as a stop and decoding keeps it as "
            "text. Mark it special in the tokenizer (tokenizer.add_special_tokens, then save_pretrained) and point "
            "model.name_or_path's tokenizer there.")
    raise ValueError(
        f"chat template ({name}) ends an assistant turn with {(after or rest)[:30]!r}, which is not a special token of "
        "the tokenizer: a model trained on it cannot reliably stop, and generation_config cannot name it. Use a "
        "template whose turns end with a special token (data.chat_template: chatml, or a .jinja file).")


def render(tokenizer, text: str, messages: list[dict], tools: list | None = None, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=text, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def fit_messages(template: ChatTemplate, messages: list[dict]) -> list[dict]:
    """The row as the template can take it: a system turn folded into the first user turn when the template has no
    system role and `data.fold_system` is on; refused (ValueError) when it is off."""
    if template.accepts_system or not messages or messages[0]["role"] != "system":
        return messages
    if not template.fold_system:
        raise ValueError(f"the chat template ({template.name}) has no system role and this row has a system turn; "
                         "set data.fold_system: true to prepend the system text to the first user turn, or drop it")
    system, rest = messages[0], messages[1:]
    first = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first is None:
        raise ValueError("a system turn and no user turn to fold it into (data.fold_system)")
    rest = [dict(m) for m in rest]
    rest[first]["content"] = f"{system['content']}\n\n{rest[first]['content']}"
    return rest


def encode_samples(tokenizer, messages: list[dict], max_length: int, tools: list | None = None,
                   template: ChatTemplate | None = None) -> list[Sample]:
    """Token ids and labels of one row: one sample, or one per assistant turn when the template rewrites earlier
    turns (see the module docstring). ValueError says why the template cannot render the row as given."""
    template = template or chat_template(tokenizer)
    messages = fit_messages(template, messages)
    uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if uses_tools and not template.supports_tools:
        raise ValueError(f"tool calling, but the chat template ({template.name}) has no tool support (no `tools` / "
                         "`tool_calls`); use data.chat_template: chatml (Hermes-style <tool_call>) or a template "
                         "with tools")
    text = template.text_for(tools)
    try:
        full = render(tokenizer, text, messages, tools)
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
        spans = {k: _turn_span(tokenizer, template, text, messages, tools, k, full) for k in turns}
    except ValueError:
        raise
    except Exception as err:  # jinja's TemplateError from raise_exception(...), or a template bug the row meets
        reason = _first_line(err)
        raise ValueError(f"the chat template ({template.name}) refused this row: {reason}"
                         f"{_missing_ids(messages, reason)}") from None
    together = all(full.startswith(rendered[:end]) for rendered, _, end in spans.values())
    texts = [full] if together else [rendered for rendered, _, _ in spans.values()]
    _check_shown(template, messages[:max(turns) + 1], tools, texts)
    if together:
        return [tokenise_spans(tokenizer, full, [(start, end) for _, start, end in spans.values()], max_length)]
    return [tokenise_spans(tokenizer, rendered, [(start, end)], max_length) for rendered, start, end in spans.values()]


def trained_samples(tokenizer, messages: list[dict], max_length: int, tools: list | None,
                    template: ChatTemplate) -> list[Sample]:
    """The row's samples that keep a trained token within max_length (as training takes them, system text fitted to
    the template); ValueError says why a row gives none."""
    samples = encode_samples(tokenizer, fit_messages(template, messages), max_length, tools, template)
    kept = [s for s in samples if any(label != -100 for label in s.labels)]
    if not kept:
        raise ValueError(f"no assistant token left within max_length={max_length} (raise data.max_length or shorten "
                         "the row)")
    return kept


def encode(tokenizer, messages: list[dict], max_length: int, tools: list | None = None,
           template: ChatTemplate | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of a row that renders as one sample (every template that keeps earlier turns as they
    were); `encode_samples` handles the others."""
    samples = encode_samples(tokenizer, messages, max_length, tools, template)
    if len(samples) != 1:
        raise ValueError("the chat template rewrites earlier turns: this row trains as one sample per answer")
    return samples[0].input_ids, samples[0].labels


def _turn_span(tokenizer, template: ChatTemplate, text: str, messages: list[dict], tools,
               k: int, full: str | None = None) -> tuple[str, int, int]:
    """(the text turn k trains in, start, end): the characters of turn k the model generates, end-of-turn included."""
    rendered = full if full is not None and k == len(messages) - 1 else render(tokenizer, text, messages[:k + 1], tools)
    if k > 0:
        prompt = render(tokenizer, text, messages[:k], tools, generation_prompt=True)
        if not rendered.startswith(prompt):  # the prompt reads otherwise once the answer follows: train it as the
            rendered = prompt + _answer_text(tokenizer, template, text, messages[k], tools)  # runtime prompts it
        start = len(prompt)
    else:  # a row opening with the answer: the generation prompt alone precedes it
        probe = [{"role": "user", "content": "x"}]
        with_prompt = render(tokenizer, text, probe, generation_prompt=True)
        header = with_prompt[len(os.path.commonprefix([with_prompt, render(tokenizer, text, probe)])):]
        start = rendered.find(header) + len(header) if header and header in rendered else -1
        if start < 0:
            raise ValueError(f"the first turn is an answer, and the chat template ({template.name}) shows no "
                             "generation prompt before it")
    end = rendered.find(template.end_of_turn, start)
    if end < 0:
        raise ValueError(f"the chat template ({template.name}) renders no {template.end_of_turn} after assistant "
                         f"turn {k + 1}, so that answer would never learn to stop")
    message, span = messages[k], rendered[start:end]
    for field in ("content", "reasoning_content"):
        if isinstance(message.get(field), str) and not _shown(message[field], span):
            raise ValueError(f"the chat template ({template.name}) does not show all of assistant turn {k + 1}'s "
                             f"`{field}` where the model answers ({_preview(message[field])}); "
                             f"{REASONING_HINT if field == 'reasoning_content' or '</think>' in message[field] else ''}"
                             "finetune refuses the row rather than train an answer the data does not give")
    calls = [c.get("function", c)["name"] for c in message.get("tool_calls") or []]
    if any(name not in span for name in calls):  # templates without tool support drop calls silently
        raise ValueError(f"the chat template ({template.name}) does not show the tool calls of assistant turn "
                         f"{k + 1}")
    return rendered, start, end + len(template.end_of_turn)


#: Why an answer's reasoning goes missing, and what to do.
REASONING_HINT = ("reasoning models' templates (DeepSeek-R1's) strip <think>...</think> from answers, and most "
                  "templates have no place for `reasoning_content` (Qwen3's renders it); use a .jinja template that "
                  "shows the reasoning; ")


def _answer_text(tokenizer, template: ChatTemplate, text: str, message: dict, tools) -> str:
    """What the template renders for `message` after its generation prompt, in a one-question conversation."""
    probe = [{"role": "user", "content": "x"}]
    prompt = render(tokenizer, text, probe, tools, generation_prompt=True)
    answered = render(tokenizer, text, probe + [message], tools)
    if not answered.startswith(prompt):
        raise ValueError(f"the chat template ({template.name}) renders an answer differently from how its "
                         f"generation prompt begins it (the prompt ends {prompt[-24:]!r}, the answer is rendered as "
                         f"{answered[len(os.path.commonprefix([prompt, answered])):][:40]!r}), so no training text "
                         "matches what a runtime would prompt the model with")
    return answered[len(prompt):]


def _check_shown(template: ChatTemplate, messages: list[dict], tools, texts: list[str]) -> None:
    """Every turn's text and every tool appear in what is trained (see the module docstring)."""
    for number, message in enumerate(messages, start=1):
        content = message.get("content")
        if isinstance(content, str) and not any(_shown(content, t) for t in texts):
            hint = " (data.fold_system: true puts it in the first user turn)" if message["role"] == "system" else ""
            raise ValueError(f"the chat template ({template.name}) does not show the text of {message['role']} turn "
                             f"{number} ({_preview(content)}){hint}; finetune refuses the row rather than train "
                             "without it")
    missing = [t["function"]["name"] for t in tools or () if not any(t["function"]["name"] in x for x in texts)]
    if missing:
        raise ValueError(f"the chat template ({template.name}) does not show the tools {missing} it was given")


def _shown(value: str, text: str) -> bool:
    """`value` appears in `text` as the template may put it: trimmed (Llama-3, Gemma) or JSON-escaped, and an answer's
    <think> block and its answer each on their own (Qwen3 re-renders `<think>a</think>b` with its own newlines)."""
    if value.strip() in text:  # nearly always: checked before splitting or escaping anything
        return True
    pieces = [piece.strip() for piece in THINK_TAG.split(value)]
    return all(not piece or piece in text or json.dumps(piece)[1:-1] in text
               or json.dumps(piece, ensure_ascii=False)[1:-1] in text for piece in pieces)


def _preview(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _missing_ids(messages: list[dict], reason: str) -> str:
    calls = [c for m in messages for c in m.get("tool_calls") or []]
    results = [m for m in messages if m["role"] == "tool"]
    about_ids = "id" in reason.lower() or "undefined" in reason.lower()  # Mistral's tojson of a missing id
    if about_ids and (any("id" not in c for c in calls) or any("tool_call_id" not in m for m in results)):
        return ("; the row's tool calls carry no `id` (or its tool results no `tool_call_id`), which templates "
                "such as Mistral's need (9 letters or digits each, the result naming its call)")
    return ""


def tokenise_spans(tokenizer, text: str, spans: list[tuple[int, int]], max_length: int) -> Sample:
    """Ids of `text` and labels: a token is trained when its characters overlap a span."""
    # The rendered text carries the template's own BOS, so none is added (as apply_chat_template does).
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # The Rust tokenizer itself: the same ids and offsets as tokenizer(...) without its per-call Python cost,
        # which was a third of preparing a row; the span's first and last tokens come from its character map.
        encoding = backend.encode(text, add_special_tokens=False)
        ids, labels = encoding.ids, [-100] * len(encoding.ids)
        for start, end in spans:
            first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
            if first is None or last is None:  # a character no token covers: fall back to the offsets
                return _labelled(ids, encoding.offsets, spans, max_length)
            labels[first:last + 1] = ids[first:last + 1]
        return Sample(ids[:max_length], labels[:max_length], len(ids) > max_length)
    out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _labelled(list(out["input_ids"]), out["offset_mapping"], spans, max_length)


def _labelled(ids: list[int], offsets, spans: list[tuple[int, int]], max_length: int) -> Sample:
    labels = [token if any(a < end and b > start for start, end in spans) else -100
              for token, (a, b) in zip(ids, offsets)]
    return Sample(list(ids[:max_length]), labels[:max_length], len(ids) > max_length)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Where generation stops: the template's end-of-turn token, the tokenizer's eos, and every eos the model's
    generation_config names (as plain `generate()` stops there too, e.g. Llama-3.1's <|eom_id|>)."""
    try:
        ids = [chat_template(tokenizer).end_of_turn_id]
    except ValueError:  # a template without a special end-of-turn token: eos is all there is
        ids = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in (*ids, tokenizer.eos_token_id, *configured) if i is not None))
