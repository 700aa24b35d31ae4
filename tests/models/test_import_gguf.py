"""`finetune import-gguf` writes its checkpoint under a temporary sibling name and renames it into place; the
temporary a killed import left is removed by the next one, which says so."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli import app
from finetune.export.gguf import converter_dir
from finetune.paths import PARTIAL_MARKER

runner = CliRunner()


@pytest.mark.slow
@pytest.mark.skipif(not (converter_dir() / "convert_hf_to_gguf.py").is_file(),
                    reason=f"llama.cpp's converter not installed at {converter_dir()}")
def test_import_removes_what_a_killed_import_left_and_leaves_only_the_checkpoint(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    monkeypatch.setenv("COLUMNS", "4000")  # one log line per line
    from transformers import AutoTokenizer

    from finetune.data.template import CHATML_TEMPLATE

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = CHATML_TEMPLATE  # export refuses a model without one
    tokenizer.save_pretrained(model)
    gguf = tmp_path / "tiny-f16.gguf"
    exported = runner.invoke(app, ["export", str(model), "--quant", "f16", "--output", str(gguf),
                                   "--max-samples", "2", "--max-new-tokens", "4"])
    assert exported.exit_code == 0, exported.output
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    left = tmp_path / f".imported.partial-{dead}"
    left.mkdir()
    (left / PARTIAL_MARKER).write_text(json.dumps({"command": "finetune import-gguf tiny-f16.gguf", "pid": dead}))
    (left / "model.safetensors").write_bytes(b"\0" * 5000)
    result = runner.invoke(app, ["import-gguf", str(gguf), "--output", str(tmp_path / "imported")])
    assert result.exit_code == 0, result.output
    assert f"removed {left} (5.1 KB)"  # the part written and its mark in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json", "imported", "model", "tiny-f16.gguf"]
    assert (tmp_path / "imported" / "config.json").is_file() and not (tmp_path / "imported" / PARTIAL_MARKER).exists()
