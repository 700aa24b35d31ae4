"""`data.sources`: several sources with their own formats and column names, mixed by weight or row count,
deterministically under the seed, with the mix reported."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml
from conftest import counting_rows
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.mixture import Source, draw, planned_rows, rename
from finetune.data.prepare import build_datasets


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa_rows(n):
    return [{"question": f"Count from {i}", "answer": " ".join(str(i + k) for k in range(4)), "id": i}
            for i in range(n)]


def prepare(tokenizer, sources, seed=0, eval_fraction=0.0):
    return build_datasets(tokenizer, train=sources, train_split="train", eval=None, eval_split="test",
                          eval_fraction=eval_fraction, format="auto", max_length=128, max_bad_fraction=0.0,
                          seed=seed, log=lambda *_: None, cache=False)


def test_draw_and_plan_follow_the_weights():
    assert planned_rows([Source("a", weight=3), Source("b", weight=1), Source("c", rows=5), Source("d")],
                        [100, 300, 2, 7]) == [300, 100, 5, 7]
    up = draw(list(range(10)), 25, seed=1)
    assert len(up) == 25 and all(2 <= n <= 3 for n in Counter(up).values())  # every row twice, five three times
    assert draw(list(range(10)), 25, seed=1) == up and draw(list(range(10)), 25, seed=2) != up
    assert rename({"question": "q", "answer": "a", "id": 1}, {"prompt": "question", "completion": "answer"}) == \
        {"id": 1, "prompt": "q", "completion": "a"}


def test_a_weighted_mixture_of_two_formats_with_column_mapping(tmp_path, tokenizer):
    chat = write(tmp_path / "chat.jsonl", counting_rows(300))
    qa = write(tmp_path / "qa.jsonl", qa_rows(100))
    sources = [Source(chat, weight=0.25), Source(qa, columns={"prompt": "question", "completion": "answer"},
                                                 weight=0.75)]
    data = prepare(tokenizer, sources)
    rows = Counter(data.origin(i)[0] for i in range(len(data.train)))
    assert rows[chat] + rows[qa] == 400 and rows[qa] / 400 == pytest.approx(0.75, abs=0.01)
    assert [m["rows"] for m in data.mix] == [100, 300] and data.mix[1]["tokens"] > 0
    for index, entry in enumerate(data.mix):  # tokens of exactly the samples drawn from that source
        drawn = [len(s["input_ids"]) for s, o in zip(data.train, data.train_rows) if o["source"] == index]
        assert entry["tokens"] == sum(drawn) and entry["samples"] == len(drawn)
    assert data.mix_lines()[1].startswith(f"{qa}: 300 rows (75.0%), ")
    assert data.problems == []
    qa_sample = next(i for i in range(len(data.train)) if data.origin(i)[0] == qa)
    text = tokenizer.decode(data.train[qa_sample]["input_ids"])
    assert "Count from" in text and "id" not in text  # `question` became the prompt; `id` is an ignored field
    again = prepare(tokenizer, sources)
    assert [again.origin(i) for i in range(len(again.train))] == [data.origin(i) for i in range(len(data.train))]
    other = prepare(tokenizer, sources, seed=1)
    assert [other.origin(i) for i in range(len(other.train))] != [data.origin(i) for i in range(len(data.train))]


def test_each_source_gives_its_share_of_held_out_rows_and_rows_counts_exactly(tmp_path, tokenizer):
    chat = write(tmp_path / "chat.jsonl", counting_rows(50))
    qa = write(tmp_path / "qa.jsonl", qa_rows(20))
    data = prepare(tokenizer, [Source(chat), Source(qa, columns={"prompt": "question", "completion": "answer"},
                                                    rows=70)], eval_fraction=0.1)
    held = Counter(c.source for c in data.eval_conversations)
    assert held == {chat: 5, qa: 2} and len(data.eval) == 7
    assert [m["rows"] for m in data.mix] == [45, 70]  # all its 45 training rows; 18 rows drawn to 70
    held_rows = {(c.source, c.row) for c in data.eval_conversations}
    assert not held_rows & {data.origin(i) for i in range(len(data.train))}  # held-out rows never train


def test_recipes_validate_and_train_a_mixture(tmp_path, write_recipe):
    qa = write(tmp_path / "qa.jsonl", qa_rows(30))
    chat = write(tmp_path / "chat.jsonl", counting_rows(30))
    mixture = {"sources": [{"path": chat, "weight": 1},
                           {"path": qa, "columns": {"prompt": "question", "completion": "answer"}, "weight": 1}]}
    recipe = write_recipe(data=mixture)
    document = yaml.safe_load(recipe.read_text())
    document["data"].pop("train")
    recipe.write_text(yaml.safe_dump(document))
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "data.sources[1]" in result.output and "prompt_completion format, 30 rows" in result.output
    report = CliRunner().invoke(app, ["data", str(recipe)])
    assert report.exit_code == 0, report.output
    assert "training mix:" in report.output and f"{qa}: 30 rows (50.0%)" in report.output
    assert "rows: 60 read, 60 kept" in report.output  # row 1 of each source is two rows
    both = dict(document["data"], train=chat)
    recipe.write_text(yaml.safe_dump({**document, "data": both}))
    refused = CliRunner().invoke(app, ["validate", str(recipe)])
    assert refused.exit_code == 2 and "set either `data.train` (one source) or `data.sources`" in refused.output


def test_a_source_with_both_a_weight_and_rows_is_refused_by_name(tmp_path, write_recipe):
    chat = write(tmp_path / "chat.jsonl", counting_rows(10))
    recipe = write_recipe(data={"sources": [{"path": chat, "weight": 1, "rows": 5}]})
    document = yaml.safe_load(recipe.read_text())
    document["data"].pop("train")
    recipe.write_text(yaml.safe_dump(document))
    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "data.sources.0" in result.output and "set either `weight` or `rows` for a source, not both" in result.output
