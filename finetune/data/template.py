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
"""

from __future__ import annotations

import os
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
CHOICES = ("auto", "chatml", "model")
_PROBE = "PROBE-ANSWER-7f3a"


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

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.text and "tool_calls" in self.text


def choose_template(tokenizer, choice: str) -> tuple[str, str, list[str]]:
    """(template text, its name, ChatML tokens to add) for `data.chat_template`: auto, chatml, model or a path."""
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if choice == "auto":
        choice = "model" if own else "chatml"
    if choice == "model":
        if not own:
            raise ValueError("data.chat_template is `model`, but this tokenizer has no chat template; use `chatml` "
                             "(or `auto`, which picks ChatML for base models) or a .jinja file")
        return own, "the model's own", []
    if choice == "chatml":
        vocab = tokenizer.get_vocab()
        return CHATML_TEMPLATE, "ChatML", [t for t in CHATML_TOKENS if t not in vocab]
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
    text = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else CHATML_TEMPLATE
    name = name or ("ChatML" if text == CHATML_TEMPLATE else "the model's own")
    try:
        probe = render(tokenizer, text, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}])
    except Exception as err:
        raise ValueError(f"chat template ({name}) cannot render a user turn and an answer: {err}") from None
    after = probe[probe.rfind(_PROBE) + len(_PROBE):].lstrip(" ")
    specials = sorted({*tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values()
                                                        if t.special)}, key=len, reverse=True)
    eot = next((token for token in specials if token and after.startswith(token)), None)
    if eot is None:
        raise ValueError(
            f"chat template ({name}) ends an assistant turn with {after[:30]!r}, which is not a special token of the "
            "tokenizer: a model trained on it cannot reliably stop, and generation_config cannot name it. Use a "
            "template whose turns end with a special token (data.chat_template: chatml adds <|im_end|>).")
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    if tokenizer(eot, add_special_tokens=False)["input_ids"] != [eot_id]:
        raise ValueError(f"chat template ({name}): its end-of-turn token {eot!r} does not encode as one token")
    try:
        render(tokenizer, text, [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "A"}])
        accepts_system = True
    except Exception:  # Gemma's and Mistral's templates raise on a system turn
        accepts_system = False
    return ChatTemplate(text, name, eot, eot_id, accepts_system, fold_system)


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
    try:
        full = render(tokenizer, template.text, messages, tools)
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
        spans = {k: _turn_span(tokenizer, template, messages, tools, k) for k in turns}
    except ValueError:
        raise
    except Exception as err:  # jinja's TemplateError from raise_exception(...), or a template bug the row meets
        raise ValueError(f"the chat template ({template.name}) refused this row: {_first_line(err)}") from None
    if tools:
        missing = [t["function"]["name"] for t in tools if t["function"]["name"] not in full]
        if missing:
            raise ValueError(f"the chat template ({template.name}) does not show the tools {missing} it was given")
    if all(full.startswith(text[:end]) for text, _, end in spans.values()):
        return [_tokenise(tokenizer, full, [(start, end) for _, start, end in spans.values()], max_length)]
    return [_tokenise(tokenizer, text, [(start, end)], max_length) for text, start, end in spans.values()]


def encode(tokenizer, messages: list[dict], max_length: int, tools: list | None = None,
           template: ChatTemplate | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of a row that renders as one sample (every template that keeps earlier turns as they
    were); `encode_samples` handles the others."""
    samples = encode_samples(tokenizer, messages, max_length, tools, template)
    if len(samples) != 1:
        raise ValueError("the chat template rewrites earlier turns: this row trains as one sample per answer")
    return samples[0].input_ids, samples[0].labels


def _turn_span(tokenizer, template: ChatTemplate, messages: list[dict], tools, k: int) -> tuple[str, int, int]:
    """(messages[:k+1] rendered, start, end): the characters of turn k the model generates, end-of-turn included."""
    text = render(tokenizer, template.text, messages[:k + 1], tools)
    if k > 0:
        prompt = render(tokenizer, template.text, messages[:k], tools, generation_prompt=True)
        start = len(os.path.commonprefix([prompt, text]))
    else:  # a row opening with the answer: the generation prompt alone precedes it
        probe = [{"role": "user", "content": "x"}]
        with_prompt = render(tokenizer, template.text, probe, generation_prompt=True)
        header = with_prompt[len(os.path.commonprefix([with_prompt, render(tokenizer, template.text, probe)])):]
        start = text.find(header) + len(header) if header and header in text else -1
        if start < 0:
            raise ValueError(f"the first turn is an answer, and the chat template ({template.name}) shows no "
                             "generation prompt before it")
    end = text.find(template.end_of_turn, start)
    if end < 0:
        raise ValueError(f"the chat template ({template.name}) renders no {template.end_of_turn} after assistant "
                         f"turn {k + 1}, so that answer would never learn to stop")
    answer = messages[k].get("content") or ""
    before = text[start:text.find(answer, start)] if answer and answer in text[start:end] else text[start:end]
    leaked = [m["role"] for m in messages[:k] if m["role"] != "assistant" and isinstance(m.get("content"), str)
              and m["content"].strip() and m["content"].strip() in before]
    if leaked:  # the prompt renders differently once the answer follows (e.g. a system prompt moved or dropped)
        raise ValueError(f"the chat template ({template.name}) renders the turns before assistant turn {k + 1} "
                         f"differently once the answer follows, so the trained span would hold {leaked[0]} text; "
                         "finetune refuses the row rather than train the wrong tokens")
    calls = [c.get("function", c)["name"] for c in messages[k].get("tool_calls") or []]
    if any(name not in text[start:end] for name in calls):  # templates without tool support drop calls silently
        raise ValueError(f"the chat template ({template.name}) does not show the tool calls of assistant turn "
                         f"{k + 1}")
    return text, start, end + len(template.end_of_turn)


def _tokenise(tokenizer, text: str, spans: list[tuple[int, int]], max_length: int) -> Sample:
    # The rendered text carries the template's own BOS, so none is added (as apply_chat_template does).
    out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = list(out["input_ids"]), []
    for token, (a, b) in zip(ids, out["offset_mapping"]):
        labels.append(token if any(a < end and b > start for start, end in spans) else -100)
    return Sample(ids[:max_length], labels[:max_length], len(ids) > max_length)


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
