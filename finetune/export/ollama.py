"""`finetune export --ollama`: a Modelfile whose TEMPLATE is the trained chat template in Ollama's Go syntax.

Jinja cannot be translated in general, so the template is read by what it renders: conversations with marker texts
in every role are rendered through it, the text between the markers gives each role's prefix and suffix and the
generation prompt, and the Go template is built from those pieces in the shape of Ollama's template docs
(`{{ if .System }}` then `{{ range .Messages }}` with a branch per role). The translation is then re-rendered in
Python for conversations with and without a system turn and with several turns, and must reproduce jinja's
text exactly; a template that does something else (rewrites earlier turns, needs tools, per-position logic) is
refused with the reason instead of writing a Modelfile that prompts the model differently from training.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.errors import UserError

SYSTEM, USER1, ANSWER, USER2 = "\x01SYSTEM\x01", "\x01USER1\x01", "\x01ANSWER\x01", "\x01USER2\x01"


@dataclass
class Pieces:
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str  # up to and including the generation prompt that follows every user turn
    assistant_suffix: str
    default_system: str | None  # what the template shows when a conversation has no system turn
    preamble: str = ""  # text before every conversation: a BOS the template writes and the tokenizer does not add


@dataclass
class ModelFile:
    text: str  # with "{gguf}" where the file name goes
    system_source: str | None


def _render(tokenizer, messages, generation_prompt=True, preamble: str = "") -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja's raise_exception: strict alternation, no system role, ...
        raise ValueError(f"it refuses a plain conversation ({err})") from None
    if preamble:
        if not text.startswith(preamble):
            raise ValueError(f"not every conversation opens with {preamble}")
        return text[len(preamble):]
    bos = tokenizer.bos_token
    # A tokenizer that adds BOS itself (Llama-3) is converted with tokenizer.ggml.add_bos_token, and llama.cpp and
    # Ollama then add it too: the template's own BOS would be doubled. SmolLM2's BOS is <|im_start|> and is not
    # added, so there it is ordinary template text.
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return text[len(bos):] if adds_bos and text.startswith(bos) else text


def _between(text: str, *markers: str) -> list[str]:
    parts, rest = [], text
    for marker in markers:
        head, found, rest = rest.partition(marker)
        if not found:
            raise ValueError(f"the template drops the text of a turn ({marker.strip(chr(1)).lower()})")
        parts.append(head)
    return parts + [rest]


def _split_turn_end(text: str, end_of_turn: str) -> tuple[str, str]:
    """`text` = a turn's suffix (through the end-of-turn token and the whitespace after it) + the next prefix."""
    at = text.find(end_of_turn)
    if at < 0:
        raise ValueError(f"a turn does not end with {end_of_turn}")
    end = at + len(end_of_turn)
    while end < len(text) and text[end] in "\n ":
        end += 1
    return text[:end], text[end:]


def pieces(tokenizer, end_of_turn: str, preamble: str = "") -> Pieces:
    system = [{"role": "system", "content": SYSTEM}]
    turns = [{"role": "user", "content": USER1}, {"role": "assistant", "content": ANSWER},
             {"role": "user", "content": USER2}]
    with_system = _render(tokenizer, system + turns, preamble=preamble)
    without = _render(tokenizer, turns, preamble=preamble)
    system_prefix, system_then_user, user_suffix, answer_then_user, user_suffix_2 = _between(
        with_system, SYSTEM, USER1, ANSWER, USER2)
    if user_suffix != user_suffix_2:
        raise ValueError("the generation prompt differs between the first and a later turn")
    assistant_suffix, user_prefix = _split_turn_end(answer_then_user, end_of_turn)
    system_suffix, user_prefix_2 = _split_turn_end(system_then_user, end_of_turn)
    if user_prefix != user_prefix_2:
        raise ValueError("a user turn opens differently after a system turn and after an answer")
    opening = _between(without, USER1)[0]
    default = None
    if opening != user_prefix:
        head, tail = system_prefix, system_suffix + user_prefix
        if not (opening.startswith(head) and opening.endswith(tail) and len(opening) > len(head) + len(tail)):
            raise ValueError("a conversation without a system turn opens with text that is neither a user turn nor "
                             "a default system turn")
        default = opening[len(head):len(opening) - len(tail)]
    return Pieces(system_prefix, system_suffix, user_prefix, user_suffix, assistant_suffix, default, preamble)


def translate(tokenizer, end_of_turn: str) -> Pieces:
    """The pieces, read first as they render and then with the tokenizer's BOS as a fixed preamble (Llama-3's
    template writes <|begin_of_text|> before a system or a user turn alike); the caller verifies either reading."""
    try:
        return pieces(tokenizer, end_of_turn)
    except ValueError:
        if not tokenizer.bos_token:
            raise
        return pieces(tokenizer, end_of_turn, tokenizer.bos_token)


def go_template(p: Pieces) -> str:
    # No `{{-` trim markers: the pieces are the template's exact text, whitespace included.
    return (p.preamble + "{{ if .System }}" + p.system_prefix + "{{ .System }}" + p.system_suffix + "{{ end }}"
            "{{ range .Messages }}{{ if eq .Role \"user\" }}" + p.user_prefix + "{{ .Content }}" + p.user_suffix +
            "{{ else if eq .Role \"assistant\" }}{{ .Content }}" + p.assistant_suffix + "{{ end }}{{ end }}")


def simulate(p: Pieces, messages: list[dict], system: str | None) -> str:
    """What Ollama renders from `go_template(p)` for `messages` with the Modelfile's SYSTEM `system` (a system turn
    in the conversation replaces it)."""
    given = [m["content"] for m in messages if m["role"] == "system"]
    system = given[0] if given else system
    out = p.preamble + (p.system_prefix + system + p.system_suffix if system else "")
    for m in messages:
        if m["role"] == "user":
            out += p.user_prefix + m["content"] + p.user_suffix
        elif m["role"] == "assistant":
            out += m["content"] + p.assistant_suffix
    return out


def constant_system(rows) -> str | None:
    """The system prompt every held-out row opens with, if there is one and the same in all."""
    systems = {r.messages[0]["content"] if r.messages and r.messages[0]["role"] == "system" else None for r in rows}
    return systems.pop() if len(systems) == 1 and rows else None


def modelfile(tokenizer, template, rows) -> ModelFile:
    try:
        if not template.accepts_system:
            raise ValueError("it has no system role")
        p = translate(tokenizer, template.end_of_turn)
        data_system = constant_system([r for r in rows if r.source != "probe"])
        system = data_system or p.default_system
        probes = [[{"role": "user", "content": "Hi"}],
                  [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                  [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": "Bye"}]]
        for probe in probes:
            if simulate(p, probe, p.default_system) != p.preamble + _render(tokenizer, probe, preamble=p.preamble):
                raise ValueError("the translation does not reproduce the template's text")
        literal = [v for v in vars(p).values() if v]
        if any("{{" in v for v in literal) or '"""' in go_template(p) + (system or ""):
            raise ValueError('its text contains """ or {{, which a Modelfile cannot quote')
    except ValueError as err:
        raise UserError(f"--ollama: the trained chat template cannot be translated into Ollama's template syntax: "
                        f"{err}. The GGUF carries the jinja template itself (tokenizer.chat_template) for runtimes "
                        "that read it; run without --ollama to export it (nothing was written)") from None
    lines = ["# Written by `finetune export --ollama`: the trained chat template in Ollama's syntax.",
             "FROM {gguf}", f'TEMPLATE """{go_template(p)}"""', f'PARAMETER stop "{template.end_of_turn}"']
    source = None
    if system:
        source = ("the system prompt every held-out row of the run has" if data_system
                  else "the template's default system prompt")
        lines.append(f"# SYSTEM: {source}")
        lines.append(f'SYSTEM """{system}"""')
    return ModelFile("\n".join(lines) + "\n", source)
