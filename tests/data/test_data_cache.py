"""Prepared data is cached under a key of its inputs: a second run reads it back, any input change prepares again,
several processes prepare once, and several workers give the same samples as one."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
from conftest import counting_rows
from datasets import load_from_disk

from finetune.data import pipeline
from finetune.data.prepare import build_datasets
from finetune.data.template import CHATML_TEMPLATE, chat_template


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare(tokenizer, path, max_length=256, eval_fraction=0.1, template=None, log=lambda *_: None, **kwargs):
    return build_datasets(tokenizer, train=str(path), train_split="train", eval=None, eval_split="test",
                          eval_fraction=eval_fraction, format="auto", max_length=max_length, max_bad_fraction=0.5,
                          seed=0, log=log, template=template, **kwargs)


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


def _damage(entry: Path, kind: str, rng) -> str:
    """Damage an entry the way disks and people do; returns the file hit."""
    arrow = sorted(entry.rglob("*.arrow"))
    if kind == "truncated arrow":
        target = arrow[rng.randrange(len(arrow))]
        size = target.stat().st_size
        with target.open("r+b") as handle:
            handle.truncate(rng.randrange(0, size))
    elif kind == "empty eval shard":
        target = next(f for f in arrow if f.parts[-2] == "eval")
        target.write_bytes(b"")
    elif kind == "missing state.json":
        target = entry / "train" / "state.json"
        target.unlink()
    elif kind == "corrupt held_out.jsonl":
        target = entry / "held_out.jsonl"
        text = target.read_bytes()
        cut = rng.randrange(1, len(text) - 1)
        target.write_bytes(text[:cut] + b"}" + text[cut + 1:])  # one byte changed, the size kept
    elif kind == "token ids changed in place":  # the size the manifest checks stays the same
        import struct

        target = next(f for f in arrow if f.parts[-2] == "train")
        data = target.read_bytes()
        first = load_from_disk(str(entry / "train"))[0]["input_ids"]
        at = data.index(struct.pack(f"<{len(first)}i", *first))
        target.write_bytes(data[:at] + struct.pack("<i", 2**31 - 1) + data[at + 4:])
    else:  # a kill before the manifest was written, or the manifest lost
        target = entry / "manifest.json"
        target.unlink()
    return str(target.relative_to(entry))


@pytest.mark.parametrize("kind", ["truncated arrow", "empty eval shard", "missing state.json",
                                  "corrupt held_out.jsonl", "no manifest", "token ids changed in place"])
def test_a_damaged_entry_is_named_in_one_line_and_prepared_again(tmp_path, tokenizer, cache, kind):
    import random

    path = write(tmp_path / "rows.jsonl", counting_rows(40))
    first = prepare(tokenizer, path)
    expected = samples(first)  # read now: damage in place shows through first's memory map
    rng = random.Random(kind)
    for attempt in range(3):  # several random offsets / bytes
        hit = _damage(Path(first.cache), kind, rng)
        lines = []
        again = prepare(tokenizer, path, log=lines.append)
        damaged = [line for line in lines if "is damaged" in line]
        assert len(damaged) == 1, (attempt, lines)
        assert f"the cache entry {first.cache} is damaged" in damaged[0] and "preparing it again" in damaged[0]
        assert hit in damaged[0] or "manifest.json" in damaged[0] or "outside the tokenizer's" in damaged[0], damaged[0]
        assert again.cache_line.startswith("data: prepared into") and again.cache == first.cache
        assert samples(again) == expected
        assert [c.messages for c in again.eval_conversations] == [c.messages for c in first.eval_conversations]
        assert prepare(tokenizer, path).cache_line.startswith("data: read from")  # whole again


@pytest.mark.slow
def test_training_writes_nothing_into_the_shared_entry(tmp_path, write_recipe, cache):
    from typer.testing import CliRunner

    from finetune.cli import app
    from finetune.data.cache import MANIFEST, entry_problem

    recipe = write_recipe(data={"eval_fraction": 0.1, "max_length": 64}, train={"max_steps": 2})
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    [entry] = [p for p in cache.iterdir() if p.is_dir()]
    listed = set(json.loads((entry / MANIFEST).read_text())["files"]) | {MANIFEST}
    assert {str(f.relative_to(entry)) for f in entry.rglob("*") if f.is_file()} == listed  # no cache-*.arrow
    assert entry_problem(entry) is None


@pytest.mark.slow  # kills a preparing process
def test_a_killed_preparation_leaves_a_temporary_that_the_next_run_removes_and_names(tmp_path, tokenizer, cache):
    import os
    import signal
    import subprocess
    import sys
    import time

    path = write(tmp_path / "rows.jsonl", counting_rows(4000))
    script = (f"import sys; sys.path[:0] = {[str(Path.cwd()), str(Path(__file__).parents[1])]}\n"
              "from transformers import AutoTokenizer\n"
              f"from test_data_cache import prepare\n"
              f"prepare(AutoTokenizer.from_pretrained({tokenizer.name_or_path!r}), {str(path)!r})\n")
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "FINETUNE_CACHE": str(cache.parent)},
                             cwd=Path(__file__).parent)
    deadline = time.monotonic() + 120
    while not list(cache.glob("*.tmp*/work")) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    [left] = list(cache.glob("*.tmp*"))
    lines = []
    data = prepare(tokenizer, path, log=lines.append)
    assert any(f"removed {left}" in line and "unfinished preparation" in line for line in lines), lines
    assert not left.exists() and len(data.train) + len(data.eval) == 4000


def test_cache_paths_of_the_wrong_kind_are_prepared_again_or_named(tmp_path, tokenizer, cache, monkeypatch):
    from finetune.errors import UserError

    path = write(tmp_path / "rows.jsonl", counting_rows(20))
    entry = Path(prepare(tokenizer, path).cache)
    shutil.rmtree(entry)
    entry.write_text("not an entry")  # a file where the entry's folder was
    lines = []
    assert len(prepare(tokenizer, path, log=lines.append).train) == 18 and entry.is_dir()
    assert any("is damaged" in line for line in lines)
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("")
    monkeypatch.setenv("FINETUNE_CACHE", str(not_a_folder))
    with pytest.raises(UserError, match=r"the prepared-data cache could not be used: Not a directory .*set "
                                        r"data.cache: false"):
        prepare(tokenizer, path)
