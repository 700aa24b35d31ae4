"""eval.json, eval.md and the model card are replaced whole or not at all: a write that fails (a full disk) leaves
the previous file as it was and no temporary beside it."""

import errno
import json
import os

import pytest
import yaml

from finetune.eval.targets import Target, write_report
from finetune.run.card import write_model_card


def fail_writing(monkeypatch, name: str) -> None:
    """The disk fills while `name` is being written (its data never reaches the disk)."""
    fsync = os.fsync

    def full_disk(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f".{name}.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                                                     "method": {"name": "lora", "r": 8}}))
    (run / "run.json").write_text(json.dumps({"artifact": "adapter", "steps": 4,
                                              "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    return run


def test_a_report_cut_short_leaves_the_previous_one_whole(run, monkeypatch):
    where = Target("model", None, None, run)
    write_report("other", where, {"results": {"model": {"loss": 1.5}}}, ["loss"], log=lambda *_: None)
    old_table = (run / "eval.md").read_text()
    assert "1.5000" in old_table
    fail_writing(monkeypatch, "eval.md")
    with pytest.raises(OSError, match="No space left"):
        write_report("other", where, {"results": {"model": {"loss": 0.25}}}, ["loss"], log=lambda *_: None)
    assert json.loads((run / "eval.json").read_text())["results"]["model"]["loss"] == 0.25  # written before
    assert (run / "eval.md").read_text() == old_table
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_a_model_card_cut_short_leaves_the_previous_one_whole(run, monkeypatch):
    card = write_model_card(run, run / "adapter")
    old = card.read_text()
    assert "lora (r=8)" in old
    (run / "eval.md").write_text("| model | loss |\n|---|---|\n| model | 0.2500 |\n")
    fail_writing(monkeypatch, "README.md")
    with pytest.raises(OSError, match="No space left"):
        write_model_card(run, run / "adapter")
    assert card.read_text() == old and sorted(p.name for p in (run / "adapter").iterdir()) == ["README.md"]
