"""Folder and glob sources as users have them: hub-style shard folders, folders a `datasets` export wrote, files of
several types and names side by side. Every data file is read, or the folder is refused naming what would be left
out; a refused row names its file."""

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from finetune.cli import app
from finetune.data.prepare import build_datasets
from finetune.data.rows import load_conversations
from finetune.data.sources import folder_listing
from finetune.errors import UserError

runner = CliRunner()


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def prepare(tokenizer, train, eval=None, **options):
    return build_datasets(tokenizer, train=str(train), train_split=options.pop("train_split", "train"),
                          eval=None if eval is None else str(eval), eval_split=options.pop("eval_split", "test"),
                          eval_fraction=0.0, format="auto", max_length=64, max_bad_fraction=0.5, seed=0, log=print,
                          **options)


def questions(tokenizer, data) -> list[int]:
    """The numbers of the rows the training samples came from, read back from their text."""
    return sorted(int(re.search(r"question (\d+)", tokenizer.decode(ids)).group(1)) for ids in data.train["input_ids"])


def mixed_folder(tmp_path):
    """A folder as users assemble one: JSON Lines under a split word, more JSON Lines, a Parquet file from pandas
    and a CSV of prompt/completion columns would differ in shape, so the third type is Parquet again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mix"
    jsonl(folder / "train.jsonl", [chat(i) for i in range(0, 10)])
    jsonl(folder / "more.jsonl", [chat(i) for i in range(10, 20)])
    pq.write_table(pa.Table.from_pylist([chat(i) for i in range(20, 30)]), folder / "part.parquet")
    return folder


def test_a_folder_of_several_types_and_names_is_read_whole_or_refused_naming_what_it_would_leave_out(tmp_path,
                                                                                                      tokenizer):
    folder = mixed_folder(tmp_path)
    with pytest.raises(UserError) as refused:
        prepare(tokenizer, folder)
    message = str(refused.value)
    assert "train.jsonl: train" in message and "would leave out more.jsonl, part.parquet" in message
    assert f"{folder}/*.jsonl, {folder}/*.parquet" in message
    (folder / "train.jsonl").rename(folder / "first.jsonl")  # no split word in any name: one split, every file
    data = prepare(tokenizer, folder)
    assert data.rows_read == 30 and questions(tokenizer, data) == list(range(30))
    every = prepare(tokenizer, f"{folder}/*")  # a glob: exactly the files it matches
    assert questions(tokenizer, every) == list(range(30))
    jsonl_only = prepare(tokenizer, f"{folder}/*.jsonl")
    assert questions(tokenizer, jsonl_only) == list(range(20))


def test_a_hub_style_shard_folder_reads_each_split_and_passes_over_its_card(tmp_path, tokenizer):
    import datasets

    folder = tmp_path / "downloaded"
    (folder / "data").mkdir(parents=True)
    train = datasets.Dataset.from_list([chat(i) for i in range(40)])
    for shard in range(2):  # what `push_to_hub` writes: data/<split>-0000k-of-0000n.parquet
        train.shard(2, shard, contiguous=True).to_parquet(str(folder / "data" / f"train-0000{shard}-of-00002.parquet"))
    datasets.Dataset.from_list([chat(i) for i in range(100, 105)]).to_parquet(
        str(folder / "data" / "test-00000-of-00001.parquet"))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# A data set\n")
    (folder / ".gitattributes").write_text("*.parquet filter=lfs\n")
    data = prepare(tokenizer, folder, eval=folder)
    assert questions(tokenizer, data) == list(range(40))
    assert sorted(int(c.messages[0]["content"].split()[1]) for c in data.eval_conversations) == list(range(100, 105))
    lines = folder_listing(str(folder), "train").lines()
    assert lines[0] == f"{folder}: 2 files: data/train-00000-of-00002.parquet, data/train-00001-of-00002.parquet"
    assert lines[1:] == [f"{folder}: files of other splits, not read for this one: data/test-00000-of-00001.parquet",
                         f"{folder}: not data, not read: .gitattributes, README.md"]
    with pytest.raises(UserError, match=r"no file named for split `validation`; its files name the splits test, "
                                        r"train. Set data.train_split / data.eval_split"):
        prepare(tokenizer, folder, eval=folder, eval_split="validation")


def test_rows_of_a_folder_are_named_by_their_file_and_row(tmp_path, tokenizer, tiny_model_dir):
    folder = tmp_path / "shards"
    jsonl(folder / "a.jsonl", [chat(i) for i in range(5)])
    jsonl(folder / "b.jsonl", [chat(5), {"messages": [{"role": "user", "content": "no answer"}]}, chat(6)])
    (folder / "c.jsonl").write_text("\n\n")  # an empty shard gives no rows and costs none
    data = prepare(tokenizer, folder)
    assert data.problems == [f"{folder / 'b.jsonl'}:2: no assistant turn"]
    rows, problems, total = load_conversations(str(folder), "train", "auto")
    assert total == 8 and problems == data.problems
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)},
                                      "data": {"train": str(folder), "max_length": 64, "max_bad_fraction": 0.5},
                                      "method": {"name": "full"}}))
    dump = tmp_path / "dump.jsonl"
    result = runner.invoke(app, ["data", str(recipe), "--dump", str(dump)])
    assert result.exit_code == 0, result.output
    assert f"{folder}: 3 files: a.jsonl, b.jsonl, c.jsonl" in " ".join(result.output.split())
    origins = [(row["source"], row["row"]) for row in map(json.loads, dump.read_text().splitlines())]
    assert sorted(origins)[-2:] == [(str(folder / "b.jsonl"), 1), (str(folder / "b.jsonl"), 3)]


def test_shards_of_different_shapes_are_one_error_naming_both_files_and_columns(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "shapes"
    rows = [chat(i) for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), folder.mkdir() or folder / "a.parquet")
    # another column that does not change the format (a system prompt) is no difference: the rows are read
    pq.write_table(pa.Table.from_pylist([{**r, "system": "Be brief."} for r in rows]), folder / "b.parquet")
    assert len(prepare(tokenizer, folder).train) == 8
    jsonl(folder / "c.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    with pytest.raises(UserError) as refused:
        prepare(tokenizer, folder)
    assert (f"only {folder / 'a.parquet'} has messages; only {folder / 'c.jsonl'} has instruction, output"
            in str(refused.value))


def test_recipes_refuse_unreadable_folders_and_empty_globs_up_front(tmp_path, tiny_model_dir):
    folder = mixed_folder(tmp_path)
    (folder / "train.jsonl").rename(folder / "first.jsonl")
    (folder / "notes.xlsx").write_text("to do\n")

    def validate(train):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": train},
                                          "method": {"name": "full"}}))
        return runner.invoke(app, ["validate", str(recipe)])

    result = validate(str(folder))
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "would be left out: notes.xlsx (.xlsx)" in message
    result = validate(f"{tmp_path}/nothing-*.jsonl")
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "the pattern matches no file" in message and "does not exist" not in message
    assert validate(f"{folder}/*.parquet").exit_code == 0


def test_an_empty_folder_is_refused_before_a_run_dir_is_claimed(tmp_path, write_recipe):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "a.jsonl").write_text("")
    (folder / "b.jsonl").write_text("\n \n")
    recipe = write_recipe(data={"train": str(folder)})
    for command in ("train", "data"):
        result = runner.invoke(app, [command, str(recipe)])
        assert result.exit_code == 2, result.output
        assert f"{folder}: no rows (an empty data file) in any of its 2 file(s)" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_the_cache_key_follows_the_data_files_not_the_card(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "shards"
    jsonl(folder / "a.jsonl", [chat(i) for i in range(3)])
    first = prepare(tokenizer, folder)
    (folder / "README.md").write_text("# notes\n")
    assert prepare(tokenizer, folder).cache == first.cache
    jsonl(folder / "b.jsonl", [chat(3)])
    again = prepare(tokenizer, folder)
    assert again.cache != first.cache and len(again.train) == 4
