"""Tool-calling rows: OpenAI and ShareGPT (LLaMA-Factory glaive_toolcall style) in one shape, rendered through the
template's own tool support; the assistant's calls train, tool results do not."""

import json

import pytest
from helpers.template_families import family_tokenizer
from test_templates import trained_runs

from finetune.data.rows import load_conversations
from finetune.data.template import encode_samples
from finetune.models.load import load_tokenizer

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI = {
    "tools": [{"type": "function", "function": WEATHER}],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "Sunny, 21 C."},
    ],
}
#: The shape of LLaMA-Factory's data/glaive_toolcall_en_demo.json: `tools` and the call are JSON strings.
SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
        {"from": "observation", "value": "sunny, 21 C"},
        {"from": "gpt", "value": "Sunny, 21 C."},
    ],
    "tools": json.dumps([WEATHER]),
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def rows(tmp_path, *records, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_conversations(str(path), "train", "auto")


def test_openai_and_sharegpt_tool_rows_normalise_to_one_shape(tmp_path):
    [openai], problems, _ = rows(tmp_path, OPENAI, name="openai.jsonl")
    [sharegpt], more, _ = rows(tmp_path, SHAREGPT, name="sharegpt.jsonl")
    assert problems == more == []
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert openai.messages[1] == {"role": "assistant", "content": "", "tool_calls": [{**call, "id": "call_1"}]}
    assert sharegpt.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    # A result is named after its call (Hermes-2-Pro's tool_use template requires the name).
    named = {"role": "tool", "content": "sunny, 21 C", "name": "get_weather"}
    assert openai.messages[2] == {**named, "tool_call_id": "call_1"}
    assert sharegpt.messages[2] == named
    assert openai.tools == sharegpt.tools == [{"type": "function", "function": WEATHER}]


@pytest.mark.parametrize("record", [OPENAI, SHAREGPT])
def test_chatml_trains_the_calls_and_answers_not_the_tools_or_results(tmp_path, tokenizer, record):
    [conv], _, _ = rows(tmp_path, record)
    [sample] = encode_samples(tokenizer, conv.messages, 4096, conv.tools)
    text = tokenizer.decode(sample.input_ids)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in text
    assert trained_runs(tokenizer, *sample[:2]) == [CALL + "<|im_end|>", "Sunny, 21 C.<|im_end|>"]


def test_qwen25_renders_tools_its_own_way_and_masks_exactly(tmp_path):
    family_tokenizer("qwen2.5").save_pretrained(tmp_path / "qwen")
    tokenizer, _ = load_tokenizer(str(tmp_path / "qwen"))
    [conv], _, _ = rows(tmp_path, SHAREGPT)
    [sample] = encode_samples(tokenizer, conv.messages, 4096, conv.tools)
    expected = tokenizer.apply_chat_template(conv.messages, tools=conv.tools, tokenize=True, return_dict=True)
    assert sample.input_ids == expected["input_ids"]
    assert tokenizer.decode(sample.input_ids).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud")
    assert trained_runs(tokenizer, *sample[:2]) == [CALL + "<|im_end|>", "Sunny, 21 C.<|im_end|>"]


def test_rows_a_template_cannot_show_or_that_are_malformed_are_refused(tmp_path):
    family_tokenizer("llama3").save_pretrained(tmp_path / "llama3")
    tokenizer, _ = load_tokenizer(str(tmp_path / "llama3"))
    [conv], _, _ = rows(tmp_path, OPENAI)
    with pytest.raises(ValueError, match=r"tool calling, but the chat template \(the model's own\) has no tool "
                                         r"support .*use data.chat_template: chatml"):
        encode_samples(tokenizer, conv.messages, 4096, conv.tools)
    bad_arguments = json.loads(json.dumps(OPENAI))
    bad_arguments["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris}"
    orphan = {"messages": [OPENAI["messages"][0], OPENAI["messages"][2], OPENAI["messages"][3]]}
    bad_tools = {**SHAREGPT, "tools": "[{\"description\": \"no name\"}]"}
    _, problems, _ = rows(tmp_path, OPENAI, bad_arguments, orphan, name="bad.jsonl")
    assert [p.split(": ", 1)[1] for p in problems] == [
        "`messages` turn 2: tool call 1 `arguments` is not valid JSON (Expecting property name enclosed in double "
        "quotes at character 1)",
        "turn 2 is a tool result that follows no tool call"]
    _, problems, _ = rows(tmp_path, SHAREGPT, bad_tools, name="bad_tools.jsonl")
    assert [p.split(": ", 1)[1] for p in problems] == ["`tools` item 1 has no `name`"]


def test_glaive_style_rows_train_and_the_adapter_carries_template_and_stop(tmp_path, write_recipe):
    from typer.testing import CliRunner

    from finetune.cli import app

    data = tmp_path / "glaive.jsonl"
    data.write_text((json.dumps(SHAREGPT) + "\n") * 12)
    recipe = write_recipe(data={"train": str(data), "max_length": 1024, "eval_fraction": 0.2},
                          method={"name": "lora", "r": 4}, train={"max_steps": 2})
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "generation_config.json").read_text())
    tokenizer, _ = load_tokenizer(str(adapter))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config["eos_token_id"] == im_end or im_end in config["eos_token_id"]
    assert "<tool_call>" in tokenizer.chat_template
    held_out = [json.loads(line) for line in (tmp_path / "run" / "held_out.jsonl").read_text().splitlines()]
    assert held_out[0]["tools"] == [{"type": "function", "function": WEATHER}]
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
