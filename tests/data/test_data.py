"""Data: format detection, normalisation, assistant-only labels on exact token ids, bad rows, held-out split."""

import json
from pathlib import Path

import pytest

from finetune.data.prepare import build_datasets
from finetune.data.rows import (
    load_conversations,
    read_saved_conversations,
    save_conversations,
    split_held_out,
)
from finetune.data.template import CHATML_TEMPLATE, encode
from finetune.errors import UserError

DATA = Path(__file__).parents[1] / "fixtures"
EXPECTED = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count from 3"},
     {"role": "assistant", "content": "3 4 5"}],
    [{"role": "user", "content": "Count from 1"}, {"role": "assistant", "content": "1 2 3"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "4 5 6"}],
]


@pytest.mark.parametrize("name", ["messages.jsonl", "sharegpt.json"])
def test_chat_formats_are_detected_and_normalised(name):
    rows, problems, total = load_conversations(str(DATA / name), "train", "auto")
    assert problems == [] and total == 2
    assert [r.messages for r in rows] == EXPECTED
    assert [r.row for r in rows] == [1, 2]


def test_alpaca_and_prompt_completion():
    rows, _, _ = load_conversations(str(DATA / "alpaca.jsonl"), "train", "auto")
    assert rows[0].messages == [{"role": "user", "content": "Count from 3"}, {"role": "assistant", "content": "3 4 5"}]
    assert rows[1].messages[0] == {"role": "user", "content": "Count from this number\n\n1"}
    rows, _, _ = load_conversations(str(DATA / "prompt_completion.jsonl"), "train", "auto")
    for row in rows:
        assert [m["role"] for m in row.messages] == ["user", "assistant"]
    assert rows[1].messages[1]["content"] == "1 2 3"


def test_parquet_is_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "Count from 3", "output": "3 4 5"}]), path)
    rows, problems, _ = load_conversations(str(path), "train", "auto")
    assert problems == [] and rows[0].messages[1]["content"] == "3 4 5"


def test_ambiguous_and_unknown_formats_are_errors(tmp_path):
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"prompt": "a", "completion": "b", "messages": []}) + "\n")
    with pytest.raises(UserError, match=r"fit several formats \(messages, prompt_completion\); set data.format"):
        load_conversations(str(both), "train", "auto")
    rows, _, _ = load_conversations(str(both), "train", "prompt_completion")  # the override settles it
    assert rows[0].messages[1]["content"] == "b"
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(UserError, match=r"odd.jsonl:1: cannot detect the data format from keys \(answer, question\)"):
        load_conversations(str(odd), "train", "auto")


def test_bad_rows_are_reported_with_file_and_row():
    rows, problems, total = load_conversations(str(DATA / "bad_rows.jsonl"), "train", "auto")
    source = str(DATA / "bad_rows.jsonl")
    assert total == 7 and [r.row for r in rows] == [1, 7]
    assert problems == [
        f"{source}:2: no assistant turn",
        f"{source}:3: `messages` must be a non-empty list",
        f"{source}:4: not valid JSON: Expecting value: line 1 column 1 (char 0)",
        f"{source}:5: unknown role 'robot' (expected one of system, user, assistant, tool)",
        f"{source}:6: `content` must be a non-empty string",
    ]


def test_too_many_bad_rows_refuse_to_start(tokenizer):
    kwargs = dict(train=str(DATA / "bad_rows.jsonl"), train_split="train", eval=None, eval_split="test",
                  eval_fraction=0.0, format="auto", max_length=64, seed=0)
    with pytest.raises(UserError, match=r"(?s)5 of 7 rows unusable \(71.4%\).*more than data.max_bad_fraction=0.5"):
        build_datasets(tokenizer, max_bad_fraction=0.5, log=lambda _: None, **kwargs)
    logged = []
    data = build_datasets(tokenizer, max_bad_fraction=0.8, log=logged.append, **kwargs)
    assert len(data.train) == 2 and "5 of 7 rows unusable" in logged[0]


def test_labels_cover_exactly_the_assistant_tokens(tokenizer):
    messages = EXPECTED[0][:1] + EXPECTED[1]  # system + two user/assistant rounds
    ids, labels = encode(tokenizer, messages, max_length=512)
    rendered = tokenizer.apply_chat_template(messages, chat_template=CHATML_TEMPLATE, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    trained = [t for t, label in zip(ids, labels) if label != -100]
    assert trained == [label for label in labels if label != -100]  # labels are the ids themselves
    # Exactly each assistant answer and the <|im_end|> that ends it, in order; nothing else.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for answer in ("1 2 3", "4 5 6"):
        expected += tokenizer(answer, add_special_tokens=False)["input_ids"] + [im_end]
    assert trained == expected
    masked = tokenizer.decode([t for t, label in zip(ids, labels) if label == -100])
    assert "Be brief." in masked and "Count from 1" in masked and "again" in masked
    assert "1 2 3" not in masked


def test_truncation_that_removes_every_answer_is_reported(tokenizer, tmp_path):
    path = tmp_path / "long.jsonl"
    long_prompt = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": EXPECTED[1]}
    path.write_text("\n".join(json.dumps(r) for r in [short] * 3 + [long_prompt]) + "\n")
    logged = []
    data = build_datasets(tokenizer, train=str(path), train_split="train", eval=None, eval_split="test",
                          eval_fraction=0.0, format="auto", max_length=32, max_bad_fraction=0.5, seed=0,
                          log=logged.append)
    assert len(data.train) == 3
    assert f"{path}:4: no assistant token left within max_length=32" in logged[0]
    assert all(len(ids) <= 32 for ids in data.train["input_ids"])


def test_held_out_split_is_seeded_and_saved(train_file, tmp_path):
    rows, _, _ = load_conversations(str(train_file), "train", "auto")
    train_a, held_a = split_held_out(rows, 0.25, seed=3)
    train_b, held_b = split_held_out(rows, 0.25, seed=3)
    _, held_c = split_held_out(rows, 0.25, seed=4)
    assert [r.row for r in held_a] == [r.row for r in held_b] and len(held_a) == 8
    assert [r.row for r in held_a] != [r.row for r in held_c]
    assert not {r.row for r in held_a} & {r.row for r in train_a}
    save_conversations(held_a, tmp_path / "held_out.jsonl")
    assert read_saved_conversations(tmp_path / "held_out.jsonl") == held_a
