"""Raw text (data.format text, .txt/.md files): detection and refusals, documents cut into blocks with nothing lost
or trained twice, packing without attention or loss across documents, and runs that train and evaluate on it."""

from __future__ import annotations

import json
import random

import pytest
import yaml
from conftest import counting_rows

from finetune.data.formats import detect_format
from finetune.data.prepare import build_datasets
from finetune.data.sources import read_records
from finetune.data.text import EmptyDocument, TextOptions, document_ids, document_samples
from finetune.errors import UserError

TOWNS = ["Avenor", "Belmira", "Corvath", "Dunmere", "Eskholt", "Farrow", "Galdane", "Hollin", "Istrey", "Jorvale",
         "Kestrel", "Lunmoor", "Marrowby", "Norhaven", "Oskirk", "Pellam", "Quarry", "Rothwick", "Selby", "Tarnow"]
RIVERS = ["Avon", "Dee", "Esk", "Ouse", "Tees", "Wear"]
TRADES = ["wool", "salt", "glass", "timber", "cheese", "copper", "paper", "rope"]


def wiki_dump(paragraphs: int, seed: int = 0) -> str:
    """Encyclopedic paragraphs from templates with varied facts, separated by blank lines (a plain-text wiki dump)."""
    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        town, river, trade = rng.choice(TOWNS), rng.choice(RIVERS), rng.choice(TRADES)
        year, people = rng.randint(1100, 1900), rng.randint(2, 90) * 100
        out.append(f"{town} is a market town on the river {river}. It was first recorded in {year} and had "
                   f"{people} inhabitants at the last census.\nThe town grew on the {trade} trade, and its "
                   f"{trade} market is still held every week.")
    return "\n\n".join(out) + "\n"


def prepare(tokenizer, train, max_length=64, text=None, eval_fraction=0.0, fmt="auto", cache=False):
    return build_datasets(tokenizer, train=train, train_split="train", eval=None, eval_split="test",
                          eval_fraction=eval_fraction, format=fmt, max_length=max_length, max_bad_fraction=0.0,
                          seed=0, log=lambda *_: None, cache=cache, text=text)


def test_detection_and_the_ambiguous_text_column(tmp_path, tokenizer):
    assert detect_format({"text": "a document", "id": 3}, "f:1") == "text"
    with pytest.raises(UserError) as err:
        detect_format({"text": "x", "messages": []}, "data.jsonl:1")
    message = str(err.value)
    assert "data.jsonl:1" in message and "`text`" in message and "messages" in message
    assert "data.format: text" in message and "data.format: messages" in message
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"text": "rendered", **counting_rows(1)[0]}) + "\n")
    with pytest.raises(UserError, match="data.format: text"):
        prepare(tokenizer, str(both))
    # Set, the format decides: the conversation trains and the other field is listed as ignored.
    data = prepare(tokenizer, str(both), fmt="messages")
    assert len(data.train) == 1 and any("text (1 rows)" in line for line in data.ignored_lines)


def test_plain_text_files_in_any_encoding_and_folders(tmp_path):
    dump = tmp_path / "dump.txt"
    dump.write_bytes("First block,\r\nline two.\r\n\r\n  \r\nSecond block ü.\r\n".encode("utf-16"))
    blocks = list(read_records(str(dump), "train", split_on="blank_line"))
    assert blocks == [(1, {"text": "First block,\nline two."}), (5, {"text": "Second block ü."})]  # by first line
    lines = list(read_records(str(dump), "train", split_on="line"))
    assert lines == [(1, {"text": "First block,"}), (2, {"text": "line two."}), (5, {"text": "Second block ü."})]
    assert list(read_records(str(dump), "train")) == [(1, {"text": "First block,\nline two.\n\n  \nSecond block ü."})]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("# Title\n\nBody.\n", encoding="utf-8-sig")
    (folder / "sub" / "b.txt").write_text("Other.")
    (folder / "empty.txt").write_text("")
    (folder / "README.md").write_text("not data")
    rows = [record["text"] for _, record in read_records(str(folder), "train")]
    assert rows == ["# Title\n\nBody.", "", "Other."]  # the empty file is an empty document, counted when prepared


def test_document_blocks_train_every_token_once(tokenizer):
    text = " ".join(f"word{i}" for i in range(60))
    ids = document_ids(tokenizer, text, TextOptions())
    assert ids[-1] == tokenizer.eos_token_id and ids[0] != tokenizer.eos_token_id  # no BOS: this tokenizer adds none
    assert document_ids(tokenizer, text, TextOptions(eos=False)) == ids[:-1]
    for overlap in (0, 7):
        samples = document_samples(tokenizer, text, 32, TextOptions(overlap=overlap))
        assert len(samples) > 3 and all(len(s.input_ids) <= 32 for s in samples)
        trained = [t for s in samples for t, label in zip(s.input_ids, s.labels) if label != -100]
        assert trained == ids  # every token once, in order: nothing cut, nothing trained twice
        for before, after in zip(samples, samples[1:]):  # a later block opens with the overlap, as context
            assert after.input_ids[:overlap] == before.input_ids[len(before.input_ids) - overlap:]
            assert after.labels[:overlap] == [-100] * overlap and after.labels[overlap] != -100
    with pytest.raises(EmptyDocument):
        document_samples(tokenizer, " \n\t", 32, TextOptions())


def test_a_text_source_prepared_with_its_report_and_cache_key(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    rows = [{"body": "A short document.", "id": 1}, {"body": ""}, {"body": "   "},
            {"body": " ".join(f"long{i}" for i in range(80))}, {"body": 5}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="docs.jsonl:5: `text` must be a string"):  # a refusal, not a skip
        prepare(tokenizer, str(path), text=TextOptions(column="body"))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    data = prepare(tokenizer, str(path), text=TextOptions(column="body"), cache=True)
    assert data.problems == [] and data.rows_read == 4
    [stats] = data.text
    assert (stats["documents"], stats["empty"], stats["split"]) == (2, 2, 1) and stats["blocks"] == len(data.train)
    assert all(s["labels"] == s["input_ids"] for s in data.train)  # every token trains
    line = data.text_lines(64, 0)[0]
    assert "2 documents" in line and "2 empty documents skipped" in line and "split into" in line
    again = prepare(tokenizer, str(path), text=TextOptions(column="body", overlap=8), cache=True)
    assert again.cache != data.cache and len(again.train) >= len(data.train)  # the options are part of the key
    assert again.text[0]["tokens"] - again.text[0]["trained"] == 8 * (again.text[0]["blocks"] - 2)
    assert "overlap tokens repeated as context, trained once" in again.text_lines(64, 8)[0]


def test_packed_documents_see_and_train_nothing_across_their_boundaries(tmp_path, tokenizer, tiny_model_dir):
    """Documents packed by TRL's BFD and collated as training collates them give each document's logits exactly
    as the document alone does, and no loss falls on a document's first token from the one before."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.data_utils import pack_dataset

    from finetune.run.trainer import PackedRows

    path = tmp_path / "docs.txt"
    path.write_text(wiki_dump(6, seed=1))
    data = prepare(tokenizer, str(path), max_length=512, text=TextOptions(split_on="blank_line"))
    packed = pack_dataset(data.train, seq_length=512, strategy="bfd")
    assert len(packed) < len(data.train)  # several documents per pack
    batch = PackedRows(tokenizer.pad_token_id)([packed[0]])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    with torch.no_grad():
        # use_cache=False as training runs it: with a cache, transformers does not read packs from the positions.
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    assert len(starts) > 2
    for start, end in zip(starts, starts[1:]):
        ids = batch["input_ids"][0, start:end]
        with torch.no_grad():
            alone = model(input_ids=ids[None]).logits[0]
        assert torch.allclose(together[start:end], alone, atol=1e-5)
        assert batch["labels"][0, start] == -100  # its first token is never a target of the previous document
        assert batch["labels"][0, start + 1:end].tolist() == ids[1:].tolist()


def write_recipe_file(path, **data):
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "."}, "data": data, "method": {"name": "full"}}))
    return path


def test_recipe_defaults_and_refusals(tmp_path):
    from finetune.recipe.load import load_recipe

    text = tmp_path / "wiki.txt"
    text.write_text(wiki_dump(3))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in counting_rows(3)))
    assert load_recipe(write_recipe_file(tmp_path / "a.yaml", train=str(text))).train.packing is True
    kept = tmp_path / "b.yaml"
    kept.write_text(yaml.safe_dump({"model": {"name_or_path": "."}, "data": {"train": str(text)},
                                    "method": {"name": "full"}, "train": {"packing": False}}))
    assert load_recipe(kept).train.packing is False  # set by the recipe: honoured
    mixed = write_recipe_file(tmp_path / "c.yaml", sources=[{"path": str(text)}, {"path": str(chat)}])
    assert load_recipe(mixed).train.packing is False  # chat rows too: as the recipe says
    with pytest.raises(UserError, match="data.overlap"):
        load_recipe(write_recipe_file(tmp_path / "d.yaml", train=str(text), max_length=64, overlap=40))
    dpo = tmp_path / "e.yaml"
    dpo.write_text(yaml.safe_dump({"model": {"name_or_path": "."}, "data": {"train": str(text)},
                                   "method": {"name": "lora"}, "objective": {"name": "dpo"}}))
    with pytest.raises(UserError, match="raw text .* objective sft only"):
        load_recipe(dpo)


def cli(*args):
    from typer.testing import CliRunner

    from finetune.cli import app

    result = CliRunner().invoke(app, [*map(str, args)])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # the console wraps long lines at its width


def test_a_wiki_dump_trains_packed_and_its_held_out_perplexity_drops(write_recipe, tmp_path, monkeypatch):
    """A plain-text wiki dump, one paragraph a document, trains packed on the tiny model; `finetune eval` scores the
    documents the run held out: perplexity only (no answers to match), the base's against the tuned model's."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    dump = tmp_path / "wiki.txt"
    dump.write_text(wiki_dump(60))
    recipe = write_recipe(data={"train": str(dump), "split_on": "blank_line", "max_length": 128,
                                "eval_fraction": 0.1},
                          train={"learning_rate": 3e-3, "max_steps": 20, "logging_steps": 5})
    report = cli("data", recipe, "--show", "1")
    assert "text " in report and "60 documents, 120 blocks of at most 128 tokens" in report
    assert "tokens trained: 100.0% (every token" in report and "sample 1 (" in report and "wiki.txt:1," in report
    assert "raw text uses none" in report and "⟦" in report.split("sample 1 (", 1)[1]
    output = cli("train", recipe)
    assert "60 documents" in output and "warning: raw text without train.packing" not in output
    run = tmp_path / "run"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["packing"] is True  # on for raw text
    held = [json.loads(line) for line in (run / "held_out.jsonl").read_text().splitlines()]
    assert len(held) == 6 and all(set(row) == {"text", "source", "row"} for row in held)
    cli("eval", run, "--compare-base")
    results = json.loads((run / "eval.json").read_text())["results"]
    base, tuned = results["base"], results["tuned"]
    assert "exact_match" not in tuned and tuned["documents"] == 6 and tuned["tokens"] == base["tokens"] > 500
    print(f"held-out perplexity: base {base['perplexity']:.1f} -> tuned {tuned['perplexity']:.1f}")
    assert tuned["perplexity"] < base["perplexity"] / 5


def test_text_and_chat_sources_mix_each_in_its_own_format(write_recipe, tmp_path, train_file, monkeypatch):
    """Continued pretraining with a share of chat rows: the documents train every token, the conversations their
    answers; both are held out as they are and evaluated each their way."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "docs"
    docs.mkdir()
    for number in range(12):
        (docs / f"page{number:02}.md").write_text(wiki_dump(2, seed=number))
    (docs / "blank.md").write_text("\n\n")
    recipe = write_recipe(data={"train": None, "sources": [{"path": str(docs), "weight": 2},
                                                          {"path": str(train_file), "weight": 1}],
                                "max_length": 128, "eval_fraction": 0.2},
                          train={"max_steps": 3, "packing": True})
    output = cli("train", recipe)
    assert "1 empty document skipped" in output and "training mix" in output
    run = tmp_path / "run"
    held = [json.loads(line) for line in (run / "held_out.jsonl").read_text().splitlines()]
    assert {"text" in row for row in held} == {True, False}
    cli("eval", run, "--max-new-tokens", "4")
    [tuned] = json.loads((run / "eval.json").read_text())["results"].values()
    assert {"exact_match", "perplexity", "text_perplexity", "text_documents"} <= tuned.keys()


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "galore", "rank": 8, "optim_bits": 32},
                                    {"name": "lisa", "activated_layers": 1, "interval_steps": 1}])
def test_every_method_trains_on_text(write_recipe, tmp_path, monkeypatch, method):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    dump = tmp_path / "wiki.txt"
    dump.write_text(wiki_dump(8))
    recipe = write_recipe(data={"train": str(dump), "split_on": "blank_line", "max_length": 128}, method=method,
                          train={"max_steps": 2})
    cli("train", recipe)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "\"loss\"" in line]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)


def test_validate_and_plan_read_text_sources(write_recipe, tmp_path, monkeypatch):
    from finetune.plan.rows import read_lengths
    from finetune.recipe.load import load_recipe

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    dump = tmp_path / "wiki.jsonl"
    dump.write_text("".join(json.dumps({"text": p}) + "\n" for p in wiki_dump(10).split("\n\n")) + '{"text": ""}\n')
    recipe = write_recipe(data={"train": str(dump), "max_length": 64, "overlap": 16})
    report = cli("validate", recipe)
    assert "text format, 11 rows" in report and "1 empty document, skipped" in report
    lengths = read_lengths(load_recipe(recipe))
    assert lengths.known and max(lengths.lengths) == 64 and len(lengths.lengths) > 20  # blocks, as training cuts them


@pytest.mark.slow
def test_the_embedded_model_learns_a_wiki_dump(tmp_path, monkeypatch):
    """SmolLM2-135M, fully fine-tuned for a few packed steps on the dump: the held-out documents' perplexity falls."""
    from finetune.paths import cache_dir

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(cache_dir() / "models")  # the embedded model, found where it is
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))  # the prepared data, not
    dump = tmp_path / "wiki.txt"
    dump.write_text(wiki_dump(30, seed=7))
    recipe = tmp_path / "wiki.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"train": str(dump), "split_on": "blank_line", "max_length": 128, "eval_fraction": 0.1},
        "method": {"name": "full"}, "model": {"gradient_checkpointing": False},
        "train": {"learning_rate": 5e-5, "max_steps": 3, "batch_size": 2, "warmup_ratio": 0.0, "logging_steps": 1,
                  "lr_scheduler": "constant", "output_dir": str(tmp_path / "run")}}))
    cli("train", recipe)
    cli("eval", tmp_path / "run", "--compare-base")
    results = json.loads((tmp_path / "run" / "eval.json").read_text())["results"]
    base, tuned = results["base"]["perplexity"], results["tuned"]["perplexity"]
    print(f"SmolLM2 held-out perplexity: base {base:.2f} -> tuned {tuned:.2f}")
    assert tuned < base * 0.7


def test_raw_text_leaves_a_base_tokenizer_without_a_chat_template_as_it_was(write_recipe, tmp_path, monkeypatch):
    """A base model whose tokenizer has no chat template (and no ChatML markers) trains on documents with its own
    vocabulary: nothing added, so the saved model and tokenizer keep the base's size."""
    from transformers import AutoTokenizer

    from benchmarks.tiny import build_tiny_llama, build_tokenizer

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    tokenizer = build_tokenizer(special_tokens=("<|endoftext|>",), eos="<|endoftext|>")
    tokenizer.save_pretrained(base)
    build_tiny_llama(len(tokenizer)).save_pretrained(base)
    dump = tmp_path / "wiki.txt"
    dump.write_text(wiki_dump(8))
    recipe = write_recipe(model={"name_or_path": str(base)}, train={"max_steps": 2},
                          data={"train": str(dump), "split_on": "blank_line", "max_length": 64})
    output = cli("train", recipe)
    assert "raw text: no chat template" in output and "chat template: ChatML" not in output
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    assert len(saved) == len(tokenizer) and not saved.chat_template
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)
