"""Path arguments recognised by their content: files and folders made the way users make them (a GGUF saved under
another name, a folder with only the GGUF, a model dir missing config.json or its tokenizer, a killed merge's output,
a weights file or a data file where a model is expected), each refused by one message naming the path and what it
is, exit 2, no traceback; a GGUF accepted as a model whatever its name."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from finetune.cli import app
from finetune.export.gguf import converter_dir
from finetune.models import inputs
from finetune.paths import PARTIAL_MARKER

runner = CliRunner()


def refused(result, *phrases: str):
    """Exit 2 with one error line holding every phrase, and no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def model_copy(tiny_model_dir: Path, where: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, where))


def test_files_and_folders_are_named_by_content(tmp_path, tiny_model_dir, train_file):
    gguf = tmp_path / "model.bin"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(24))
    pickle = tmp_path / "weights.gguf"  # a name that lies the other way
    pickle.write_bytes(b"\x80\x02}q\x00.")
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = {gguf: inputs.GGUF, pickle: inputs.PICKLE, empty: inputs.EMPTY_DIR, train_file: inputs.DATA_FILE,
                tiny_model_dir / "model.safetensors": inputs.SAFETENSORS, tiny_model_dir: inputs.MODEL_DIR,
                tmp_path / "nope.gguf": inputs.MISSING, tiny_model_dir / "config.json": inputs.MARKER_FILE,
                "org/model": inputs.HUB, "smollm2-135m-instruct": inputs.ALIAS}
    assert {str(k): inputs.identify(k).kind for k in expected} == {str(k): v for k, v in expected.items()}


def test_safetensors_file_where_a_model_directory_is_expected(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    refused(runner.invoke(app, ["chat", str(weights)], input=""), str(weights), "a safetensors weights file",
            "`finetune chat`", f"perhaps {tiny_model_dir}")


def test_data_file_as_the_model_is_refused_before_the_run_dir_is_claimed(write_recipe, train_file, tmp_path):
    recipe = write_recipe(model={"name_or_path": str(train_file)})
    refused(runner.invoke(app, ["train", str(recipe)]), str(train_file), "a data file", "model.name_or_path",
            "data.train")
    assert not (tmp_path / "run").exists()


def test_model_dir_without_config_json(tiny_model_dir, tmp_path):
    model = model_copy(tiny_model_dir, tmp_path / "model")
    (model / "config.json").unlink()
    refused(runner.invoke(app, ["eval", str(model), "--data", "x.jsonl"]), str(model),
            "model weights (model.safetensors) but no config.json", "restore config.json")


def test_model_dir_without_tokenizer_is_not_blamed_on_sentencepiece(tiny_model_dir, tmp_path):
    model = model_copy(tiny_model_dir, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    for args in (["chat", str(model)], ["export", str(model), "--output", str(tmp_path / "out.gguf")]):
        line = refused(runner.invoke(app, args, input=""), str(model), "no tokenizer files", "incomplete")
        assert "sentencepiece" not in line.lower()
    assert not (tmp_path / "out.gguf").exists()


def test_a_killed_merge_output_names_the_command_that_replaces_it(tiny_model_dir, tmp_path):
    partial = tmp_path / "merged"
    partial.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, partial / name)
    command = f"finetune merge {tmp_path / 'run'} --output {partial}"
    (partial / PARTIAL_MARKER).write_text(json.dumps({"command": command}))
    (partial / "merged.gguf").write_bytes(b"GGUF" + b"\0" * 64)  # what an export was still writing
    for args in (["chat", str(partial)], ["export", str(partial)],
                 ["import-gguf", str(partial / "merged.gguf"), "--output", str(tmp_path / "imported")]):
        refused(runner.invoke(app, args, input=""), f"an incomplete output of `{command}`",
                "remove it and run the command again")


def test_hub_id_with_the_probe_failing_fails_at_once_with_the_offline_hint(write_recipe, tmp_path, monkeypatch):
    from finetune.models import hub

    monkeypatch.setattr(hub, "offline_reason", lambda: "no connection to huggingface.co:443: test")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    recipe = write_recipe(model={"name_or_path": "some-org/not-cached-model"})
    refused(runner.invoke(app, ["train", str(recipe)]), "`some-org/not-cached-model`", "cannot be reached",
            "no connection to huggingface.co:443: test", "smollm2-135m-instruct", "finetune pull")
    assert not (tmp_path / "run").exists()
    data = write_recipe(name="data.yaml", data={"train": "some-org/not-cached-data"})
    refused(runner.invoke(app, ["train", str(data)]), "data `some-org/not-cached-data`", "local data file")
    (tmp_path / "hf" / "hub" / "models--some-org--not-cached-model").mkdir(parents=True)
    hub.require_hub("some-org/not-cached-model", "model", "x")  # in the cache: loads offline from there


def test_probe_of_an_unreachable_endpoint_takes_about_a_second(monkeypatch):
    import time

    from finetune.models import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    hub.offline_reason.cache_clear()
    try:
        start = time.monotonic()
        assert "127.0.0.1:9" in hub.offline_reason()
        assert time.monotonic() - start < 3
        monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # the libraries would go through it: probe it
        monkeypatch.delenv("HF_HUB_OFFLINE")  # the first probe set it, for the libraries
        hub.offline_reason.cache_clear()
        assert "127.0.0.1:9" in hub.offline_reason()
    finally:
        hub.offline_reason.cache_clear()


@pytest.mark.slow
def test_hub_id_with_a_refused_endpoint_fails_in_seconds_not_a_minute(tmp_path):
    """A real process with HF_HUB_OFFLINE unset and the endpoint refusing connections, timed after its imports."""
    script = ("import json, sys, time\nfrom typer.testing import CliRunner\nfrom finetune.cli import app\n"
              "import finetune.eval.chat, transformers\nstart = time.monotonic()\n"
              "result = CliRunner().invoke(app, ['chat', 'some-org/not-cached-model'], input='')\n"
              "print(json.dumps([time.monotonic() - start, result.exit_code, result.output]))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE" and "PROXY" not in k.upper()}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    seconds, code, output = json.loads(done.stdout.strip().splitlines()[-1])
    assert code == 2 and "cannot be reached" in output and "finetune pull" in output, output
    assert seconds < 5, f"{seconds:.1f}s"


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model as a real GGUF, written by llama.cpp's converter the way `finetune export` writes one."""
    if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's converter not installed at {converter_dir()}; run `make install`")
    from transformers import AutoTokenizer

    from finetune.export.gguf import Source, convert
    from finetune.models.load import template_for

    template = template_for(AutoTokenizer.from_pretrained(tiny_model_dir))
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    convert(Source(tiny_model_dir, "tiny", tiny_model_dir), out, "f16", template.text, template.end_of_turn_id)
    return out


@pytest.mark.slow
def test_gguf_under_another_name_is_refused_where_a_run_is_expected_and_converted_as_a_model(
        gguf_file, tmp_path, write_recipe, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    renamed = Path(shutil.copy(gguf_file, tmp_path / "model.bin"))
    refused(runner.invoke(app, ["merge", str(renamed), "--output", str(tmp_path / "out")]), str(renamed),
            "a GGUF file", "`finetune merge`", f"finetune import-gguf {renamed}")
    bare = Path(shutil.copy(gguf_file, tmp_path / "model"))  # no suffix at all
    result = runner.invoke(app, ["import-gguf", str(bare), "--output", str(tmp_path / "imported")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "imported" / "config.json").is_file()
    recipe = write_recipe(model={"name_or_path": str(renamed)}, train={"max_steps": 1})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model" / "config.json").is_file()


@pytest.mark.slow
def test_folder_with_only_the_gguf(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "download"
    folder.mkdir()
    shutil.copy(gguf_file, folder / "tiny.gguf")
    refused(runner.invoke(app, ["merge", str(folder), "--output", str(tmp_path / "out")]), str(folder),
            "a directory holding only a GGUF file (tiny.gguf)", f"finetune import-gguf {folder / 'tiny.gguf'}")
    result = runner.invoke(app, ["import-gguf", str(folder), "--output", str(tmp_path / "imported")])
    assert result.exit_code == 0, result.output  # one GGUF: the folder can only mean it
    shutil.copy(gguf_file, folder / "tiny-copy.gguf")
    refused(runner.invoke(app, ["chat", str(folder)], input=""), "GGUF files (tiny-copy.gguf, tiny.gguf)",
            "Name one of the files")


def test_adapter_dir_points_at_its_run(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"finetune_version": "x", "status": "complete"}))
    (run / "adapter" / "adapter_config.json").write_text(yaml.safe_dump({"peft_type": "LORA"}))
    refused(runner.invoke(app, ["merge", str(run / "adapter"), "--output", str(tmp_path / "out")]),
            "a LoRA adapter directory", f"Name its run directory, {run}")


def test_gguf_conversions_are_cached_by_content_not_name_and_size(tmp_path, monkeypatch):
    from finetune.data import cache
    from finetune.models.gguf import converted_dir

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path, fill in ((first, b"\x01"), (second, b"\x02")):  # two fine-tunes of one base: same name, same size
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + fill * 4096)
    hashed = []
    monkeypatch.setattr(cache, "file_digest", lambda path, real=cache.file_digest: hashed.append(path) or real(path))
    assert converted_dir(first) != converted_dir(second)
    assert converted_dir(first) == converted_dir(first) and hashed == [first, second]  # read once per version
    before = first.stat().st_mtime_ns
    first.write_bytes(b"GGUF" + b"\x03" * 4096)  # rewritten in place, same size (a second later, as people do)
    os.utime(first, ns=(before + 10**9, before + 10**9))
    assert converted_dir(first) != converted_dir(second) and len(hashed) == 3


def test_eval_of_a_gguf_without_rows_is_refused_before_converting_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.bin"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    refused(runner.invoke(app, ["eval", str(gguf)]), str(gguf), "a GGUF file, so it has no held-out rows",
            "pass --data FILE")
    assert not (tmp_path / "cache").exists()  # nothing converted


@pytest.mark.slow
def test_a_gguf_cut_short_is_named_as_such(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "downloading.gguf"
    data = gguf_file.read_bytes()
    cut.write_bytes(data[:len(data) * 7 // 10])  # an interrupted download
    for args in (["import-gguf", str(cut), "--output", str(tmp_path / "o")], ["chat", str(cut)]):
        refused(runner.invoke(app, args, input=""), str(cut), "it is cut short", "Fetch or copy it again")
