"""`data.streaming`: training rows tokenised as training reads them; a fixed held-out source; a resumed run
continues at the same position as an uninterrupted one."""

from __future__ import annotations

import json

import pytest
from conftest import counting_rows
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.mixture import Source
from finetune.data.prepare import build_datasets
from finetune.run.report import read_metrics

runner = CliRunner()


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_stream_yields_what_preparation_gives_and_refuses_bad_rows(tmp_path, tokenizer):
    rows = counting_rows(30)
    rows[4] = {"messages": [{"role": "user", "content": "no answer"}]}
    path = write(tmp_path / "rows.jsonl", rows)
    logged = []
    streamed = build_datasets(tokenizer, train=path, train_split="train", eval=None, eval_split="test",
                              eval_fraction=0.0, format="auto", max_length=64, max_bad_fraction=0.1, seed=0,
                              log=logged.append, cache=False, streaming=True)
    prepared = build_datasets(tokenizer, train=path, train_split="train", eval=None, eval_split="test",
                              eval_fraction=0.0, format="auto", max_length=64, max_bad_fraction=0.1, seed=0,
                              log=lambda *_: None, cache=False)
    got = sorted((tuple(s["input_ids"]), tuple(s["labels"])) for s in streamed.train)
    assert got == sorted((tuple(s["input_ids"]), tuple(s["labels"])) for s in prepared.train)  # shuffled, same set
    assert [tuple(s["input_ids"]) for s in streamed.train] != [tuple(s["input_ids"]) for s in prepared.train]
    assert [tuple(s["input_ids"]) for s in streamed.train] == [tuple(s["input_ids"]) for s in streamed.train]
    assert any(f"{path}:5: no assistant turn" in line for line in logged)
    assert streamed.mean_train_tokens == pytest.approx(prepared.mean_train_tokens)


def test_too_many_bad_streamed_rows_stop_with_the_reasons(tmp_path, tokenizer, monkeypatch):
    from finetune.data import stream
    from finetune.errors import UserError

    monkeypatch.setattr(stream, "CHECK_AFTER", 10)
    rows = counting_rows(40)
    for i in range(0, 40, 3):
        rows[i] = {"messages": "oops"}
    path = write(tmp_path / "rows.jsonl", rows)
    data = build_datasets(tokenizer, train=[Source(path)], train_split="train", eval=None, eval_split="test",
                          eval_fraction=0.0, format="auto", max_length=64, max_bad_fraction=0.1, seed=0,
                          log=lambda *_: None, cache=False, streaming=True)
    with pytest.raises(UserError, match="of the first .* streamed rows are unusable, more than data.max_bad_fraction"):
        list(data.train)


@pytest.mark.slow  # a resumed run: seconds the edit loop's tier cannot spare
def test_a_streaming_run_trains_evaluates_and_resumes_where_it_stopped(write_recipe, tmp_path):
    held = write(tmp_path / "held.jsonl", counting_rows(8, seed=5))
    data = {"streaming": True, "eval": held}
    whole = write_recipe(name="whole.yaml", data=data,
                         train={"max_steps": 6, "output_dir": str(tmp_path / "whole"), "eval_steps": 6})
    result = runner.invoke(app, ["train", str(whole)])
    assert result.exit_code == 0, result.output
    assert "streamed / 8" in result.output
    metrics = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    expected = [r["loss"] for r in metrics if "loss" in r]
    assert len(expected) == 6 and any("eval_loss" in r for r in metrics)
    assert len((tmp_path / "whole" / "held_out.jsonl").read_text().splitlines()) == 8

    half = write_recipe(name="half.yaml", data=data,
                        train={"max_steps": 3, "save_steps": 3, "output_dir": str(tmp_path / "half")})
    assert runner.invoke(app, ["train", str(half)]).exit_code == 0
    resumed = runner.invoke(app, ["train", str(half), "--resume", "--set", "train.max_steps=6"])
    assert resumed.exit_code == 0, resumed.output
    got = [r["loss"] for r in read_metrics(tmp_path / "half" / "metrics.jsonl") if "loss" in r]
    assert got == pytest.approx(expected, rel=1e-4)  # the same batches in the same order after the resume


def test_streaming_recipes_that_cannot_work_are_refused(write_recipe):
    recipe = write_recipe(data={"streaming": True, "eval_fraction": 0.1}, train={"max_steps": None,
                                                                                 "packing": True})
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2
    for expected in ("`data.streaming` needs `train.max_steps`", "not `data.eval_fraction`",
                     "`data.streaming` with `train.packing` is not supported yet"):
        assert expected in result.output


def test_finetune_data_reports_on_the_first_samples_of_a_stream(write_recipe):
    recipe = write_recipe(data={"streaming": True}, train={"max_steps": 4})
    result = runner.invoke(app, ["data", str(recipe), "--show", "1"])
    assert result.exit_code == 0, result.output
    assert "covers the first 32 training samples of the stream" in result.output
    assert "rows: 32 read, 32 kept" in result.output and ", streamed, " in result.output


def test_streamed_sources_interleave_by_weight(tmp_path, tokenizer):
    from itertools import islice

    first = write(tmp_path / "a.jsonl", counting_rows(400, seed=1))
    second = write(tmp_path / "b.jsonl", [{"prompt": f"Say {i}", "completion": "ok"} for i in range(400)])
    data = build_datasets(tokenizer, train=[Source(first, weight=3), Source(second, weight=1)], train_split="train",
                          eval=None, eval_split="test", eval_fraction=0.0, format="auto", max_length=64,
                          max_bad_fraction=0.0, seed=0, log=lambda *_: None, cache=False, streaming=True)
    texts = [tokenizer.decode(s["input_ids"]) for s in islice(iter(data.train), 400)]
    share = sum("Count from" in text for text in texts) / len(texts)
    assert share == pytest.approx(0.75, abs=0.07)
