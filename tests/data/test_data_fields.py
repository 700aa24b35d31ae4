"""Every field of a supported row format reaches the rendered conversation and labels, or the row is refused."""

import json

import pytest

from finetune.data.formats import MULTIMODAL
from finetune.data.prepare import build_datasets
from finetune.data.rows import load_conversations
from finetune.data.template import CHATML_TEMPLATE, encode
from finetune.errors import UserError

ANSWER = [{"role": "user", "content": "Count from 3"}, {"role": "assistant", "content": "3 4 5"}]


def write_rows(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def load(path, format="auto"):
    return load_conversations(path, "train", format)


def prepare(tokenizer, path, log, max_bad_fraction=0.0):
    return build_datasets(tokenizer, train=path, train_split="train", eval=None, eval_split="test", eval_fraction=0.0,
                          format="auto", max_length=256, max_bad_fraction=max_bad_fraction, seed=0, log=log)


def trained_text(tokenizer, messages):
    ids, labels = encode(tokenizer, messages, max_length=512)
    return tokenizer.decode([label for label in labels if label != -100])


def test_sharegpt_row_system_becomes_the_first_turn(tmp_path, tokenizer):
    conversations = [{"from": "human", "value": "Count from 3"}, {"from": "gpt", "value": "3 4 5"}]
    twice = [{"from": "system", "value": "x"}, *conversations]
    path = write_rows(tmp_path, [{"system": "Be brief.", "conversations": conversations},
                                 {"system": "Twice.", "conversations": twice}])
    rows, problems, _ = load(path)
    assert rows[0].messages == [{"role": "system", "content": "Be brief."}] + ANSWER
    rendered = tokenizer.apply_chat_template(rows[0].messages, chat_template=CHATML_TEMPLATE, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert problems == [f"{path}:2: both a row-level `system` and a system turn; keep one"]


def test_alpaca_history_comes_before_the_current_turn_and_is_trained(tmp_path, tokenizer):
    path = write_rows(tmp_path, [
        {"system": "Be brief.", "instruction": "again", "input": "", "output": "4 5 6",
         "history": [["Count from 1", "1 2 3"]]},
        {"instruction": "a", "output": "b", "history": [["only the instruction"]]},
        {"instruction": "a", "output": "b", "history": "not a list"},
    ])
    rows, problems, _ = load(path)
    assert rows[0].messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count from 1"},
        {"role": "assistant", "content": "1 2 3"}, {"role": "user", "content": "again"},
        {"role": "assistant", "content": "4 5 6"}]
    assert trained_text(tokenizer, rows[0].messages) == "1 2 3<|im_end|>4 5 6<|im_end|>"
    assert problems == [
        f"{path}:2: `history` item 1 must be an [instruction, response] pair of non-empty strings",
        f"{path}:3: `history` must be a list of [instruction, response] pairs",
    ]


def test_weight_zero_assistant_turn_is_context_only(tmp_path, tokenizer):
    turns = [{"role": "user", "content": "Count from 1"}, {"role": "assistant", "content": "1 2 3", "weight": 0},
             {"role": "user", "content": "again"}, {"role": "assistant", "content": "4 5 6", "weight": 1}]
    bad = [
        [*ANSWER[:1], {"role": "assistant", "content": "x", "weight": 0.5}],
        [{"role": "user", "content": "a", "weight": 1}, ANSWER[1]],
        [ANSWER[0], {"role": "assistant", "content": "x", "weight": 0}],
    ]
    path = write_rows(tmp_path, [{"messages": turns}] + [{"messages": m} for m in bad])
    rows, problems, _ = load(path)
    messages = rows[0].messages
    assert messages[1] == {"role": "assistant", "content": "1 2 3", "weight": 0} and "weight" not in messages[3]
    # Rendered byte for byte as without the flag; only the weight-1 answer and its <|im_end|> carry labels.
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    assert (tokenizer.apply_chat_template(messages, chat_template=CHATML_TEMPLATE, tokenize=False)
            == tokenizer.apply_chat_template(plain, chat_template=CHATML_TEMPLATE, tokenize=False))
    ids, labels = encode(tokenizer, messages, max_length=512)
    assert ids == encode(tokenizer, plain, max_length=512)[0]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [label for label in labels if label != -100] == tokenizer("4 5 6")["input_ids"] + [im_end]
    assert problems == [
        f"{path}:2: `messages` turn 2: `weight` 0.5 is not supported; use 0 (context only) or 1 (trained)",
        f"{path}:3: `messages` turn 1: `weight` 1 on a user turn; only assistant turns are trained",
        f"{path}:4: every assistant turn has `weight` 0: nothing to train",
    ]


def test_content_parts_text_is_joined_and_media_refused(tmp_path, tokenizer):
    parts = [{"type": "text", "text": "Count "}, {"type": "text", "text": "from 3"}]
    path = write_rows(tmp_path, [
        {"messages": [{"role": "user", "content": parts},
                      {"role": "assistant", "content": [{"type": "text", "text": "3 4 5"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, ANSWER[1]]},
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, ANSWER[1]]},
        {"messages": [{"role": "user", "content": [{"kind": "text"}]}, ANSWER[1]]},
    ])
    rows, problems, _ = load(path)
    assert rows[0].messages == ANSWER
    assert trained_text(tokenizer, rows[0].messages) == "3 4 5<|im_end|>"
    assert problems[0] == f"{path}:2: `messages` turn 1 has an `image_url` content part: {MULTIMODAL}"
    assert problems[1].startswith(f"{path}:3: `messages` turn 1 has an `input_audio` content part: multimodal")
    assert problems[2].startswith(f"{path}:4: `messages` turn 1: content parts must be {{\"type\": \"text\"")


@pytest.mark.parametrize("row, where", [
    ({"messages": ANSWER, "functions": [{"name": "f"}]}, "`functions`"),
    ({"messages": [ANSWER[0], {"role": "assistant", "content": "x", "function_call": {"name": "f"}}]},
     "`messages` turn 2 has `function_call`"),
    ({"messages": [ANSWER[0], {"role": "function", "content": "sunny"}, ANSWER[1]]},
     "`messages` turn 2 has role `function`"),
])
def test_legacy_openai_function_calling_is_refused(tmp_path, row, where):
    path = write_rows(tmp_path, [{"messages": ANSWER}, row])
    rows, problems, _ = load(path)
    assert len(rows) == 1
    assert problems == [f"{path}:2: {where}: OpenAI's deprecated function-calling fields are not supported; use "
                        "`tools`, assistant `tool_calls` and `role: tool` results"]


@pytest.mark.parametrize("row, shape", [
    ({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "with `prompt`"),
    ({"chosen": [*ANSWER], "rejected": [ANSWER[0], {"role": "assistant", "content": "9"}]},
     "with the prompt inside each answer"),
    ({"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
      "rejected": {"from": "gpt", "value": "5"}}, "with `conversations`"),
    ({"instruction": "2+2?", "input": "", "chosen": "4", "rejected": "5"}, "with `instruction`"),
])
def test_preference_data_is_refused_with_one_clear_error(tmp_path, tokenizer, row, shape):
    path = write_rows(tmp_path, [row] * 50)
    with pytest.raises(UserError) as err:
        prepare(tokenizer, path, log=lambda _: None, max_bad_fraction=1.0)
    message = str(err.value)
    assert message.startswith(f"{path}:1: this is preference data ({shape}, a preferred `chosen` and a `rejected`")
    assert "the recipe's objective is supervised fine-tuning (sft). Set `objective: {name: dpo}`" in message
    assert "no assistant turn" not in message and "max_bad_fraction" not in message and message.count(path) == 1


def test_kto_rows_are_refused_and_never_trained(tmp_path, tokenizer):
    kto = write_rows(tmp_path, [{"prompt": "2+2?", "completion": "5", "label": False}] * 10, "kto.jsonl")
    with pytest.raises(UserError, match=r"kto.jsonl:1: this is unpaired preference data \(KTO: a `label` per row"):
        prepare(tokenizer, kto, log=lambda _: None, max_bad_fraction=1.0)
    tagged = write_rows(tmp_path, [{"conversations": ANSWER, "kto_tag": True}], "tagged.jsonl")
    with pytest.raises(UserError, match="unpaired preference data"):
        load(tagged)
    # A labelled row after plain ones (or with data.format set) is refused on its own row, not trained.
    mixed = write_rows(tmp_path, [{"prompt": "2+2?", "completion": "4"}, {"prompt": "2+2?", "completion": "5",
                                                                          "label": False}], "mixed.jsonl")
    rows, problems, _ = load(mixed)
    assert [r.row for r in rows] == [1]
    assert problems == [f"{mixed}:2: `label`: a `label` field (KTO data marks each answer as good or bad with it): "
                        "SFT cannot honour it; train such rows with objective.name: kto, or drop the field if it "
                        "says nothing about the answer's quality"]


def test_multimodal_rows_are_refused(tmp_path):
    path = write_rows(tmp_path, [
        {"messages": ANSWER},
        {"messages": [{"role": "user", "content": "<image>What is this?"}, ANSWER[1]], "images": ["cat.png"]},
        {"messages": ANSWER, "videos": ["clip.mp4"]},
        {"messages": ANSWER, "audios": ["a.wav"]},
        {"messages": [{"role": "user", "content": "What is <image>?"}, ANSWER[1]]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ])
    rows, problems, _ = load(path)
    assert len(rows) == 1
    tail = MULTIMODAL
    assert tail.startswith("multimodal rows are not supported: this is a text-only model") and "Qwen2-VL" in tail
    assert problems == [f"{path}:2: `images`: {tail}", f"{path}:3: `videos`: {tail}", f"{path}:4: `audios`: {tail}",
                        f"{path}:5: a `<image>` placeholder in turn 1: {tail} (markup with its closing tags is text)",
                        f"{path}:6: a sharegpt row in a messages file (the format comes from the first row or "
                        "data.format; one format per file)"]
    sharegpt = write_rows(tmp_path, [{"conversations": [{"from": "human", "value": "<audio>Transcribe"},
                                                        {"from": "gpt", "value": "hi"}]}], "audio.jsonl")
    assert load(sharegpt)[1] == []  # `<audio>`/`<video>` in text are HTML5 elements: text (test_data_found.py)
    alpaca = write_rows(tmp_path, [{"instruction": "Describe <video> please", "output": "a clip", "videos": ["v.mp4"]}],
                        "video.jsonl")
    assert load(alpaca)[1] == [f"{alpaca}:1: `videos`: {tail}"]


def test_unknown_fields_are_logged_once_and_empty_known_ones_accepted(tmp_path, tokenizer):
    turns = [{"role": "user", "content": "Count from 3", "timestamp": 1},
             {"role": "assistant", "content": "3 4 5", "tool_calls": None, "refusal": None, "weight": None}]
    rows = [{"id": i, "source": "web", "messages": turns, "tools": [], "images": [], "chosen": None, "rejected": None,
             "label": None} for i in range(40)]  # null columns as a merged `datasets` schema gives them
    path = write_rows(tmp_path, rows)
    logged = []
    data = prepare(tokenizer, path, log=logged.append)
    assert len(data.train) == 40
    assert logged == [f"ignored fields in {path}: id (40 rows), messages[].timestamp (40 rows), source (40 rows)"]
