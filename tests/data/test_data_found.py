"""Data problems a first-time user found: each row's fields honoured or refused, files in every encoding and layout
read, and messages that say what is wrong."""

import json

import pytest
import yaml
from helpers.template_families import family_tokenizer
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.prepare import build_datasets
from finetune.data.rows import load_conversations, read_source
from finetune.data.template import encode
from finetune.errors import UserError

ANSWER = [{"role": "user", "content": "Count from 3"}, {"role": "assistant", "content": "3 4 5"}]
SHAREGPT = [{"from": "human", "value": "Count from 3"}, {"from": "gpt", "value": "3 4 5"}]


def write_rows(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def load(path):
    return load_conversations(str(path), "train", "auto")


def prepare(tokenizer, path, log=print, max_bad_fraction=0.0):
    return build_datasets(tokenizer, train=str(path), train_split="train", eval=None, eval_split="test",
                          eval_fraction=0.0, format="auto", max_length=256, max_bad_fraction=max_bad_fraction, seed=0,
                          log=log)


def trained_text(tokenizer, messages):
    _, labels = encode(tokenizer, messages, max_length=512)
    return tokenizer.decode([label for label in labels if label != -100])


def validate(tmp_path, train, **data):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"train": str(train), **data}, "method": {"name": "full"}}))
    return CliRunner().invoke(app, ["validate", str(recipe)])


# 1. An empty tools list, however given, is no tools: the row is a plain chat.

def test_empty_tools_given_as_json_text_is_a_plain_chat(tmp_path):
    # glaive_toolcall_en_demo.json: plain chats carry `"tools": "[]"`; Llama-3.0's template has no tool support, so
    # a row counted as tool-calling would be refused.
    path = write_rows(tmp_path, [{"conversations": SHAREGPT, "tools": tools}
                                 for tools in ("[]", " [ ] ", "", None, [])])
    rows, problems, _ = load(path)
    assert problems == [] and [row.tools for row in rows] == [None] * 5
    data = prepare(family_tokenizer("llama3"), path)
    assert len(data.train) == 5 and data.problems == []


# 2. HTML/XML text trains; media fields, media parts and a bare `<image>` placeholder are refused.

def test_html_text_trains_and_media_rows_are_refused(tmp_path, tokenizer):
    html = [{"role": "user", "content": "How do I embed a clip?"},
            {"role": "assistant", "content": "Use the <video> element; <audio> works the same way."}]
    svg = [{"role": "user", "content": "Which SVG element shows a bitmap?"},
           {"role": "assistant", "content": "<image> inside <svg>...</svg>, with an href."}]
    path = write_rows(tmp_path, [
        {"messages": html},
        {"messages": svg},
        {"messages": [{"role": "user", "content": "<image>What is this?"}, ANSWER[1]]},
        {"messages": [{"role": "user", "content": "<video>Describe it"}, ANSWER[1]], "videos": ["clip.mp4"]},
        {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}, ANSWER[1]]},
    ])
    rows, problems, _ = load(path)
    assert [row.row for row in rows] == [1, 2]
    assert trained_text(tokenizer, rows[0].messages).startswith("Use the <video> element; <audio> works")
    assert [p.split(": ", 1)[1].split(":")[0] for p in problems] == [
        "a `<image>` placeholder in turn 1", "`videos`", "`messages` turn 1 has an `audio` content part"]


# 3. LLaMA-Factory v1's `loss_weight` is honoured like `weight`; masking-like turn fields are refused by name.

def test_loss_weight_is_honoured_like_weight(tmp_path, tokenizer):
    turns = [{"role": "user", "content": "Count from 3", "loss_weight": 0.0},
             {"role": "assistant", "content": "3 4 5", "loss_weight": 0.0},
             {"role": "user", "content": "Count from 7", "loss_weight": 0.0},
             {"role": "assistant", "content": "7 8 9", "loss_weight": 1.0}]
    path = write_rows(tmp_path, [{"messages": turns},
                                 {"messages": [ANSWER[0], {**ANSWER[1], "loss_weight": 0.5}]},
                                 {"messages": [{**ANSWER[0], "loss_weight": 1.0}, ANSWER[1]]},
                                 {"messages": [ANSWER[0], {**ANSWER[1], "loss_weight": 1, "weight": 0}]}])
    rows, problems, _ = load(path)
    assert len(rows) == 1 and rows[0].messages[1]["weight"] == 0 and "weight" not in rows[0].messages[3]
    assert trained_text(tokenizer, rows[0].messages) == "7 8 9<|im_end|>"
    assert [p.split(": ", 1)[1] for p in problems] == [
        "`messages` turn 2: `loss_weight` 0.5 is not supported; use 0 (context only) or 1 (trained)",
        "`messages` turn 1: `loss_weight` 1 on a user turn; only assistant turns are trained",
        "`messages` turn 2: `weight` 0 and `loss_weight` 1 disagree"]


@pytest.mark.parametrize("key, value", [("mask", True), ("train", False), ("loss", 0), ("ignore", True)])
def test_masking_like_turn_fields_are_refused_by_name(tmp_path, key, value):
    path = write_rows(tmp_path, [{"messages": ANSWER}, {"messages": [ANSWER[0], {**ANSWER[1], key: value}]}])
    read = read_source(path, "train", "auto")
    assert len(read.rows) == 1 and not read.ignored
    assert read.problems == [f"{path}:2: `messages` turn 2 has `{key}`: looks like it says whether this turn is "
                             "trained, which finetune cannot honour; use `weight` (or `loss_weight`): 0 = context "
                             "only, 1 = trained"]


# 4. validate reads every row: a refused row past the first thousands is reported.

def test_validate_checks_every_row(tmp_path):
    rows = [{"messages": ANSWER}] * 4999 + [{"messages": [ANSWER[0]]}]
    path = write_rows(tmp_path, rows)
    result = validate(tmp_path, path, max_bad_fraction=0.0)
    assert result.exit_code == 2, result.output
    assert "5000 rows (every row checked)" in result.output and f"{path}:5000: no assistant turn" in result.output


# 5. UTF-16 and UTF-32 files (with or without a byte-order mark) read in full.

@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-16-le", "utf-32"])
def test_utf16_and_utf32_files_read_every_row(tmp_path, encoding):
    rows = [{"messages": [{"role": "user", "content": f"Café {n}"}, ANSWER[1]]} for n in range(3)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode(encoding))
    read, problems, total = load(jsonl)
    assert (problems, total, [r.row for r in read]) == ([], 3, [1, 2, 3])
    assert read[0].messages[0]["content"] == "Café 0"
    array = tmp_path / "rows.json"
    array.write_bytes(json.dumps(rows, ensure_ascii=False).encode(encoding))
    assert len(load(array)[0]) == 3
    table = tmp_path / "rows.csv"
    table.write_bytes("instruction,output\nCafé,3 4 5\nCount,1 2\n".encode(encoding))
    assert [r.messages[0]["content"] for r in load(table)[0]] == ["Café", "Count"]


# 6. A `save_to_disk` directory is read with load_from_disk; rows are labelled with the directory.

def test_save_to_disk_directories_are_read(tmp_path):
    import datasets

    rows = [{"messages": ANSWER}, {"messages": [ANSWER[0]]}]
    single = tmp_path / "single"
    datasets.Dataset.from_list(rows).save_to_disk(str(single))
    read, problems, total = load(single)
    assert (len(read), total, read[0].source, read[0].row) == (1, 2, str(single), 1)
    assert problems == [f"{single}:2: no assistant turn"]
    split = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1] * 3),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(split))
    assert len(load(split)[0]) == 3
    assert len(load_conversations(str(split), "test", "auto")[0]) == 1
    with pytest.raises(UserError, match=r"no split `validation` in this saved dataset \(it has train, test\)"):
        load_conversations(str(split), "validation", "auto")


# 7. Messages that say what is wrong.

def test_file_problems_are_named(tmp_path):
    jsonl_as_json = tmp_path / "rows.json"
    jsonl_as_json.write_text(json.dumps({"messages": ANSWER}) + "\n" + json.dumps({"messages": ANSWER}) + "\n")
    with pytest.raises(UserError, match=r"not valid JSON \(line 2\): Extra data. The file looks like JSON Lines "
                                        r"\(one row per line\): rename it to .jsonl"):
        load(jsonl_as_json)
    header_only = tmp_path / "header.csv"
    header_only.write_text("instruction,output\n")
    with pytest.raises(UserError, match=r"header.csv: no rows \(only the header line\)"):
        load(header_only)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("instruction,output\na,b\nc,d,e\n")
    with pytest.raises(UserError, match="Expected 2 fields in line 3, saw 3"):
        load(ragged)


@pytest.mark.parametrize("content", [b"\xef\xbb\xbf", b"\xef\xbb\xbf\n", b" \n\t\r\n", "\u00a0\n".encode()])
def test_bom_or_whitespace_only_jsonl_has_no_rows(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match="no rows"):
        load(path)
    result = validate(tmp_path, path)
    assert result.exit_code == 2 and "no rows (an empty data file)" in result.output
    assert "not valid JSON" not in result.output and "max_bad_fraction" not in result.output


def test_every_row_unusable_gives_no_max_bad_fraction_advice(tmp_path, tokenizer):
    path = write_rows(tmp_path, [{"messages": [ANSWER[0]]}] * 3)
    with pytest.raises(UserError) as err:
        prepare(tokenizer, path, max_bad_fraction=0.5)
    assert "3 of 3 rows unusable" in str(err.value) and "max_bad_fraction" not in str(err.value)
    result = validate(tmp_path, path)
    assert result.exit_code == 2 and "every row (3) is refused" in result.output
    assert "max_bad_fraction" not in result.output


# 8. Only a boolean `label` is KTO; a class label is an ignored field.

def test_a_class_label_is_ignored_and_a_boolean_one_is_kto(tmp_path, tokenizer):
    path = write_rows(tmp_path, [{"messages": ANSWER, "label": "sports"}, {"messages": ANSWER, "label": 3}])
    logged = []
    data = prepare(tokenizer, path, log=logged.append)
    assert len(data.train) == 2 and logged == [f"ignored fields in {path}: label (2 rows)"]
    kto = write_rows(tmp_path, [{"messages": ANSWER, "label": False}], "kto.jsonl")
    with pytest.raises(UserError, match="this is unpaired preference data"):
        load(kto)
