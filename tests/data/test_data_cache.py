"""Prepared data is cached under a key of its inputs: a second run reads it back, any input change prepares again,
several processes prepare once, and several workers give the same samples as one."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from conftest import counting_rows

from finetune.data import pipeline
from finetune.data.prepare import build_datasets
from finetune.data.template import CHATML_TEMPLATE, chat_template


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare(tokenizer, path, max_length=256, eval_fraction=0.1, template=None, **kwargs):
    return build_datasets(tokenizer, train=str(path), train_split="train", eval=None, eval_split="test",
                          eval_fraction=eval_fraction, format="auto", max_length=max_length, max_bad_fraction=0.5,
                          seed=0, log=lambda *_: None, template=template, **kwargs)


def samples(data) -> list[tuple]:
    return [(tuple(s["input_ids"]), tuple(s["labels"])) for s in data.train]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def test_a_second_run_reads_the_cache_and_any_input_change_prepares_again(tmp_path, tokenizer, cache):
    rows = counting_rows(40) + [{"messages": [{"role": "user", "content": "hi"}]}]  # one refused row
    path = write(tmp_path / "rows.jsonl", rows)
    first = prepare(tokenizer, path)
    assert first.cache_line.startswith("data: prepared into the cache") and first.cache.startswith(str(cache))
    again = prepare(tokenizer, path)
    assert again.cache_line == f"data: read from the cache {first.cache}"
    assert samples(again) == samples(first) and len(again.train) == 36 and len(again.eval) == 4
    assert again.problems == first.problems == [f"{path}:41: no assistant turn"]
    assert [c.row for c in again.eval_conversations] == [c.row for c in first.eval_conversations]
    assert again.rows_read == 41 and again.origin(0) == (str(path), first.origin(0)[1])

    changed = [dict(r) for r in rows]
    changed[7] = counting_rows(1, seed=99)[0]  # one row's content
    write(path, changed)
    edited = prepare(tokenizer, path)
    assert edited.cache != first.cache and edited.cache_line.startswith("data: prepared into")
    write(path, rows)
    assert prepare(tokenizer, path).cache == first.cache  # the same bytes again: the same entry
    assert prepare(tokenizer, path, max_length=128).cache != first.cache
    folded = chat_template(tokenizer, fold_system=True)
    assert prepare(tokenizer, path, template=folded).cache != first.cache
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.chat_template = CHATML_TEMPLATE.replace("<|im_start|>' + message['role']", "<|im_start|> ' + message['role']")
    assert prepare(tokenizer=other, path=path).cache != first.cache
    uncached = prepare(tokenizer, path, cache=False)
    assert uncached.cache_line is None and samples(uncached) == samples(first)
    entries = [p for p in cache.iterdir() if p.suffix not in (".lock", ".prepared")]
    assert len(entries) == 5 and all((p / "meta.json").is_file() and not (p / "work").exists() for p in entries)


def test_several_workers_give_the_samples_one_gives(tmp_path, tokenizer, cache, monkeypatch):
    path = write(tmp_path / "rows.jsonl", counting_rows(60) + [{"messages": "bad"}])
    monkeypatch.setattr(pipeline, "ROWS_PER_PROCESS", 10)
    assert pipeline.processes(61, 2) == 2
    one = prepare(tokenizer, path, num_proc=1, cache=False)
    two = prepare(tokenizer, path, num_proc=2, cache=False)
    assert samples(two) == samples(one) and two.problems == one.problems
    assert [two.origin(i) for i in range(len(two.train))] == [one.origin(i) for i in range(len(one.train))]


def _prepare_in_process(path: str, cache_dir: str, model_dir: str, queue) -> None:
    import os

    os.environ["FINETUNE_CACHE"] = cache_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    queue.put(prepare(tokenizer, path).cache_line)


@pytest.mark.slow
def test_processes_preparing_the_same_data_at_once_prepare_it_once(tmp_path, tiny_model_dir):
    """What DDP ranks on one machine do: the first prepares under the lock, the other waits and reads."""
    path = write(tmp_path / "rows.jsonl", counting_rows(400))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_prepare_in_process,
                               args=(str(path), str(tmp_path / "cache"), str(tiny_model_dir), queue))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    lines = sorted(queue.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert [line.split(" the cache ")[0] for line in lines] == ["data: prepared into", "data: read from"]
    assert lines[0].split(" the cache ")[1] == lines[1].split(" the cache ")[1]
    [record] = (tmp_path / "cache" / "data").glob("*.prepared")
    assert len(record.read_text().splitlines()) == 1
