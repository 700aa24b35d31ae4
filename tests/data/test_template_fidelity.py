"""Published templates that move, drop or rewrite what a row says: every text trains where a runtime shows it, or the
row is refused; nothing vanishes (templates kept as published in tests/fixtures/templates/)."""

from __future__ import annotations

import json

import pytest
from helpers.template_families import TEMPLATES

from benchmarks.tiny import build_tokenizer
from finetune.data.formats import to_messages
from finetune.data.template import CHATML_TEMPLATE, chat_template, encode_samples
from finetune.data.tools import parse_tools

MISTRAL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                  "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "<|endoftext|>")
R1_TOKENS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<|endoftext|>")
SYSTEM = {"role": "system", "content": "Answer in one line."}
TURNS = [{"role": "user", "content": "Count from 3"}, {"role": "assistant", "content": "3 4 5"},
         {"role": "user", "content": "Go on"}, {"role": "assistant", "content": "6 7"}]
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def tokenizer_with(template, specials, eos, bos=None, plain=()):
    tokenizer = build_tokenizer(special_tokens=specials, eos=eos)
    if bos:
        tokenizer.bos_token = bos
    tokenizer.add_tokens(list(plain))
    tokenizer.chat_template = template
    return tokenizer


def trained(tokenizer, sample):
    return tokenizer.decode([t for t in sample.labels if t != -100])


def test_mistral_nemo_trains_each_answer_after_the_prompt_a_runtime_builds():
    """The published Mistral-Nemo-2407 template shows the system prompt only in the last user turn."""
    tokenizer = tokenizer_with((TEMPLATES / "mistral-nemo.jinja").read_text(), MISTRAL_TOKENS, "</s>", "<s>")
    samples = encode_samples(tokenizer, [SYSTEM, *TURNS], 256)
    assert [trained(tokenizer, s) for s in samples] == ["3 4 5</s>", "6 7</s>"]
    for sample, end in zip(samples, (2, 4)):
        prompt = tokenizer.apply_chat_template([SYSTEM, *TURNS[:end - 1]], tokenize=False, add_generation_prompt=True)
        assert "Answer in one line." in prompt
        assert tokenizer.decode(sample.input_ids) == prompt + TURNS[end - 1]["content"] + "</s>"


def test_mistral_tool_rows_need_call_ids_and_say_so():
    tokenizer = tokenizer_with((TEMPLATES / "mistral-nemo.jinja").read_text(), MISTRAL_TOKENS, "</s>", "<s>")
    tools = [{"type": "function", "function": WEATHER}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    row = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": "", "tool_calls": [call]},
           {"role": "tool", "content": "sunny", "name": "get_weather"},
           {"role": "assistant", "content": "Sunny."}]
    with pytest.raises(ValueError, match="tool calls carry no `id`.*Mistral's need"):
        encode_samples(tokenizer, row, 512, tools)
    row[1] = {**row[1], "tool_calls": [{**call, "id": "abc123xyz"}]}
    row[2] = {**row[2], "tool_call_id": "abc123xyz"}
    (sample,) = encode_samples(tokenizer, row, 512, tools)
    answers = trained(tokenizer, sample)
    assert answers.startswith("[TOOL_CALLS]") and '"get_weather"' in answers and '"abc123xyz"' in answers
    assert answers.endswith("</s>Sunny.</s>") and "sunny" not in answers


def test_a_template_that_drops_the_system_text_has_no_system_role():
    """Mistral-7B-Instruct-v0.3's first published template renders no system turn at all, without an error."""
    tokenizer = tokenizer_with((TEMPLATES / "mistral-v0.3.jinja").read_text(), MISTRAL_TOKENS, "</s>", "<s>")
    assert not chat_template(tokenizer).accepts_system
    with pytest.raises(ValueError, match="has no system role and this row has a system turn; set data.fold_system"):
        encode_samples(tokenizer, [SYSTEM, *TURNS], 256)
    (sample,) = encode_samples(tokenizer, [SYSTEM, *TURNS], 256, template=chat_template(tokenizer, fold_system=True))
    assert "Answer in one line.\n\nCount from 3" in tokenizer.decode(sample.input_ids)
    assert trained(tokenizer, sample) == " 3 4 5 </s> 6 7 </s>"


def test_deepseek_r1_strips_reasoning_so_a_row_with_reasoning_is_refused():
    tokenizer = tokenizer_with((TEMPLATES / "deepseek-r1.jinja").read_text(), R1_TOKENS, "<｜end▁of▁sentence｜>",
                               "<｜begin▁of▁sentence｜>", plain=("<think>", "</think>"))
    thinking = [TURNS[0], {"role": "assistant", "content": "<think>3, then up</think>3 4 5"}]
    with pytest.raises(ValueError, match=r"does not show all of assistant turn 2's `content`.*strip <think>"):
        encode_samples(tokenizer, thinking, 256)
    assert [trained(tokenizer, s) for s in encode_samples(tokenizer, [SYSTEM, *TURNS], 256)] == [
        "3 4 5<｜end▁of▁sentence｜>6 7<｜end▁of▁sentence｜>"]


def test_reasoning_content_trains_where_the_template_shows_it_and_is_refused_where_not():
    qwen3 = tokenizer_with((TEMPLATES / "qwen3.jinja").read_text(), ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                           "<|im_end|>", plain=("<think>", "</think>"))
    messages = to_messages({"messages": [TURNS[0], {**TURNS[1], "reasoning_content": "Start at 3."}]}, "messages")
    (sample,) = encode_samples(qwen3, messages, 256)
    assert trained(qwen3, sample) == "<think>\nStart at 3.\n</think>\n\n3 4 5<|im_end|>"
    chatml = build_tokenizer()
    assert chat_template(chatml).text == CHATML_TEMPLATE
    with pytest.raises(ValueError, match="does not show all of assistant turn 2's `reasoning_content`"):
        encode_samples(chatml, messages, 256)
    with pytest.raises(ValueError, match="name the reasoning `reasoning_content`"):
        to_messages({"messages": [TURNS[0], {**TURNS[1], "thinking": "Start at 3."}]}, "messages")


def test_named_templates_train_tool_rows_with_their_tool_use_template(tmp_path):
    """Hermes-2-Pro/3 and Command-R ship `default` and `tool_use` templates (a list in tokenizer_config.json)."""
    from finetune.models.load import load_tokenizer

    tokenizer = tokenizer_with({"default": (TEMPLATES / "hermes3.jinja").read_text(),
                                "tool_use": (TEMPLATES / "hermes2pro-tool_use.jinja").read_text()},
                               ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>",
                                "<|endoftext|>"), "<|im_end|>", "<|begin_of_text|>",
                               plain=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"))
    tokenizer.save_pretrained(tmp_path)
    loaded, added = load_tokenizer(str(tmp_path))
    assert added == [] and isinstance(loaded.chat_template, dict)  # kept whole: the run saves both
    template = chat_template(loaded)
    assert template.tool_text is not None and template.end_of_turn == "<|im_end|>"
    # LLaMA-Factory's glaive_toolcall_en_demo shape: results carry no name; the call's is used
    record = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": json.dumps({"sky": "sunny"})},
        {"from": "gpt", "value": "Sunny."}], "tools": json.dumps([WEATHER])}
    (sample,) = encode_samples(loaded, to_messages(record, "sharegpt"), 1024, parse_tools(record["tools"]), template)
    text, answers = loaded.decode(sample.input_ids), trained(loaded, sample)
    assert "<tools>" in text and "You are a function calling AI model" in text  # the tool_use template's system
    assert answers.startswith("<tool_call>") and '"get_weather"' in answers and answers.endswith("Sunny.<|im_end|>")
    assert "sunny" not in answers.replace("Sunny.", "")  # the tool result is context, not trained
    (plain,) = encode_samples(loaded, TURNS, 256, None, template)
    assert "<tools>" not in loaded.decode(plain.input_ids)  # rows without tools: the default template


def test_end_of_turn_after_whitespace_and_non_special_markers(tmp_path):
    from finetune.models.load import load_tokenizer

    coder = tokenizer_with("{% for m in messages %}{% if m.role == 'user' %}### Instruction:\n{{ m.content }}\n"
                           "{% else %}### Response:\n{{ m.content }}\n<|EOT|>\n{% endif %}{% endfor %}"
                           "{% if add_generation_prompt %}### Response:\n{% endif %}",
                           ("<|endoftext|>", "<|EOT|>"), "<|EOT|>")
    (sample,) = encode_samples(coder, TURNS[:2], 256)  # deepseek-coder's answer\n<|EOT|>
    assert trained(coder, sample) == "3 4 5\n<|EOT|>"
    plain = build_tokenizer(special_tokens=("<|endoftext|>",), eos="<|endoftext|>")
    plain.add_tokens(["<|im_start|>", "<|im_end|>"])  # ordinary added tokens, as in some re-uploads
    plain.chat_template = CHATML_TEMPLATE
    with pytest.raises(ValueError, match="ordinary added token, not a special one"):
        chat_template(plain)
    plain.save_pretrained(tmp_path)
    fixed, added = load_tokenizer(str(tmp_path), chat_template="chatml")  # finetune's own ChatML: made special
    assert added == plain.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) and len(fixed) == len(plain)
    assert chat_template(fixed).end_of_turn == "<|im_end|>"
    glm = tokenizer_with("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}",
                         ("<|endoftext|>", "<|user|>", "<|assistant|>"), "<|endoftext|>")
    with pytest.raises(ValueError, match="renders nothing after an assistant answer"):
        chat_template(glm)


def test_a_template_that_drops_a_user_turn_is_refused():
    dropping = tokenizer_with("{% for m in messages %}{% if m.role == 'assistant' or loop.index0 < 1 %}"
                              "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
                              ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_end|>")
    with pytest.raises(ValueError, match=r"does not show the text of user turn 3 \('Go on'\)"):
        encode_samples(dropping, TURNS, 256)


def test_eval_and_chat_fold_the_system_text_as_the_run_did(tmp_path):
    """A Gemma-style run with data.fold_system: eval's prompts and chat's --system are folded the same way."""
    from helpers.template_families import family_model_dir

    from finetune.data.rows import Conversation
    from finetune.errors import UserError
    from finetune.eval.chat import chat_loop
    from finetune.eval.sft import evaluate_model
    from finetune.eval.targets import Target, load_for_eval, run_fold_system

    model_dir = family_model_dir("gemma", tmp_path / "gemma")
    model, tokenizer = load_for_eval(str(model_dir), None, str(model_dir))
    rows = [Conversation([SYSTEM, *TURNS[:2]], "held_out.jsonl", 1)]
    with pytest.raises(UserError, match="held_out.jsonl:1: .*has no system role"):
        evaluate_model(model, tokenizer, rows, 1, 2)
    metrics, predictions = evaluate_model(model, tokenizer, rows, 1, 2, fold_system=True)
    assert metrics["assistant_tokens"] > 0 and len(predictions) == 1

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("data:\n  fold_system: true\n")
    assert run_fold_system(tmp_path / "run") and not run_fold_system(tmp_path)
    import finetune.eval.targets as evaluate

    seen = []
    original = tokenizer.apply_chat_template

    def spy(messages, *args, **kwargs):
        seen.append(messages)
        return original(messages, *args, **kwargs)

    tokenizer.apply_chat_template = spy
    target = Target(str(model_dir), None, None, tmp_path, fold_system=True)
    patched = pytest.MonkeyPatch()
    patched.setattr(evaluate, "resolve_target", lambda *_: target)
    patched.setattr(evaluate, "load_for_eval", lambda *_: (model, tokenizer))
    lines = iter(["Count from 3", ""])
    try:
        chat_loop("run", 2, "Answer in one line.", read=lambda _: next(lines), write=lambda *_: None)
    finally:
        patched.undo()
    assert seen[-1] == [{"role": "user", "content": "Answer in one line.\n\nCount from 3"}]
