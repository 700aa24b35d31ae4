"""`finetune merge` and `finetune export` killed with SIGKILL at several points, as a user's Ctrl-\\, an OOM killer or a
lost machine would: the final output is never there half-written, at most one temporary is left, and the next run of
the same command removes it, says so, and succeeds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.export.gguf import converter_dir
from finetune.paths import PARTIAL_MARKER, cache_dir

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = cache_dir() / "models" / "smollm2-135m-instruct"
needs_embedded = pytest.mark.skipif(not (EMBEDDED / "config.json").exists(),
                                    reason=f"embedded SmolLM2 not cached at {EMBEDDED}; run `make model`")
needs_converter = pytest.mark.skipif(not (converter_dir() / "convert_hf_to_gguf.py").is_file(),
                                     reason=f"llama.cpp's converter not installed at {converter_dir()}")


class Command:
    """One `finetune ...` process, its output in a file (read while it runs)."""

    def __init__(self, args: list[str], log: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "COLUMNS": "4000"}  # one log line per line: rich wraps at the terminal width
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "finetune.cli", *args], stdout=out,
                                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def output(self) -> str:
        return self.log.read_text()

    def kill_when(self, seen, timeout: float = 240) -> None:
        """SIGKILL as soon as `seen()` is true (polled every few milliseconds)."""
        deadline = time.monotonic() + timeout
        while not seen():
            assert self.process.poll() is None, f"finished before the kill point:\n{self.output()}"
            assert time.monotonic() < deadline, f"kill point not reached in {timeout}s:\n{self.output()}"
            time.sleep(0.003)
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait() == -signal.SIGKILL


def converters_in(scratch: Path, wait: float = 0.5) -> list[str]:
    """Command lines of processes still converting into `scratch`, after giving a dying child `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "finetune.export.convert" in text and f"{scratch}" in text:
                found.append(text)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def temporaries(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.partial*"))


def assert_one_temporary_of(parent: Path, name: str, command: str) -> Path:
    """The killed command left exactly one temporary beside `name`, marked with the command that replaces it."""
    left = temporaries(parent, name)
    assert len(left) == 1, left
    assert json.loads((left[0] / PARTIAL_MARKER).read_text())["command"].startswith(command)
    return left[0]


def run_again(args: list[str], monkeypatch) -> str:
    """The same command once more, in this process (it has the libraries imported already)."""
    monkeypatch.setenv("COLUMNS", "4000")  # one log line per line: rich wraps at the terminal width
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def first(parent: Path, pattern: str):
    """Something to wait for: a path under `parent` matching `pattern` exists."""
    return lambda: next(parent.glob(pattern), None) is not None


@pytest.mark.slow
@needs_embedded
def test_merge_killed_before_and_while_saving_leaves_one_temporary_the_next_merge_removes(demo_run, tmp_path,
                                                                                          monkeypatch):
    out = tmp_path / "merged"
    args = ["merge", str(demo_run), "--output", str(out)]
    killed = Command(args, tmp_path / "1.log")
    killed.kill_when(first(tmp_path, f".merged.partial-*/{PARTIAL_MARKER}"))  # claimed, nothing loaded yet
    assert not out.exists()
    earlier = assert_one_temporary_of(tmp_path, "merged", "finetune merge")

    killed = Command(args, tmp_path / "2.log")
    killed.kill_when(first(tmp_path, ".merged.partial-*/model*.safetensors"))  # the weights half-written
    assert f"removed {earlier}" in killed.output()
    assert not out.exists()
    earlier = assert_one_temporary_of(tmp_path, "merged", "finetune merge")

    said = run_again(args, monkeypatch)
    assert f"removed {earlier}" in said and "MB)" in said and f"saved {out}" in said
    assert temporaries(tmp_path, "merged") == [] and not (out / PARTIAL_MARKER).exists()
    assert json.loads((out / "merge.json").read_text())["dtype"] == "bf16"
    assert (out / "model.safetensors").stat().st_size > 200e6  # 135M parameters in bf16, whole


@pytest.fixture
def tiny_lora_run(write_recipe, tmp_path) -> Path:
    recipe = write_recipe(method={"name": "lora", "r": 4}, data={"eval_fraction": 0.25}, train={"max_steps": 2})
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


@pytest.mark.slow
@needs_converter
def test_export_killed_while_merging_and_while_checking_the_gguf_leaves_one_temporary(tiny_lora_run, tmp_path,
                                                                                       monkeypatch):
    run, where, name = tiny_lora_run, tiny_lora_run / "gguf-q8_0", "run-q8_0.gguf"
    before = set(run.iterdir())
    args = ["export", str(run), "--quant", "q8_0", "--max-samples", "2", "--max-new-tokens", "4"]
    killed = Command(args, tmp_path / "1.log")
    killed.kill_when(first(where, f".{name}.partial-*/**/model.safetensors"))  # the merged fp32 model, in scratch
    assert sorted(where.iterdir()) == temporaries(where, name)  # no .gguf, no export.json: only the temporary
    earlier = assert_one_temporary_of(where, name, "finetune export")
    assert set(run.iterdir()) == before | {where}  # nothing hidden in the run dir

    killed = Command(args, tmp_path / "2.log")
    killed.kill_when(first(where, f".{name}.partial-*/{name}"))  # converted, being read back and checked
    assert f"removed {earlier}" in killed.output()
    assert sorted(where.iterdir()) == temporaries(where, name)
    earlier = assert_one_temporary_of(where, name, "finetune export")

    killed = Command(args, tmp_path / "3.log")
    killed.kill_when(lambda: converters_in(where, wait=0) != converters_in(earlier, wait=0))  # converter running
    assert f"removed {earlier}" in killed.output()
    earlier = assert_one_temporary_of(where, name, "finetune export")
    assert not converters_in(earlier), "the converter outlived the killed export, still writing its temporary"

    old = run / ".export-merge-k2j4x9q1"  # where finetune before the scratch directory merged, never cleaned
    (old / "merged").mkdir(parents=True)
    (old / "merged" / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    said = run_again(args, monkeypatch)
    assert f"removed {earlier}" in said and f"removed {old} (2.0 MB)" in said
    assert sorted(p.name for p in where.iterdir()) == ["export.json", name]
    record = json.loads((where / "export.json").read_text())
    assert record["gguf"] == str(where / name) and record["bytes"] == (where / name).stat().st_size
    assert set(run.iterdir()) == before | {where}

