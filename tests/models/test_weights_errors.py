"""`merge`, `eval` and `chat` on runs whose weight files are missing, truncated or unsafe: one message naming the
file, exit 2, no traceback, and no pickle payload ever run. Plus: no bitsandbytes chatter before a user error."""

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()
COMMANDS = ("merge", "eval", "chat")


class Payload:
    """Pickles to a call of os.system: what a malicious pytorch_model.bin does when it is unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _train(root: Path, model_dir: Path, train_file: Path, method: dict) -> Path:
    recipe = {"model": {"name_or_path": str(model_dir), "gradient_checkpointing": False},
              "data": {"train": str(train_file), "max_length": 64, "eval_fraction": 0.125}, "method": method,
              "train": {"learning_rate": 1e-3, "max_steps": 1, "batch_size": 4, "output_dir": str(root / "run")}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", str(root / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, train_file):
    """One finished LoRA run and one full run, copied (never damaged) by each test."""
    return {name: _train(tmp_path_factory.mktemp(name), tiny_model_dir, train_file, method)
            for name, method in (("lora", {"name": "lora", "r": 4}), ("full", {"name": "full"}))}


def copy_run(trained, kind: str, where: Path) -> Path:
    """A copy of a run; a LoRA run gets its own copy of the base model (run.json pointed at it) to damage."""
    run = where / kind
    shutil.copytree(trained[kind], run)
    if kind == "lora":
        info = json.loads((run / "run.json").read_text())
        shutil.copytree(info["base_model_path"], where / "base")
        info["base_model"] = info["base_model_path"] = str(where / "base")
        (run / "run.json").write_text(json.dumps(info))
    return run


def invoke(command: str, run: Path):
    args = {"merge": ["merge", str(run), "--output", str(run.parent / "merged")],
            "eval": ["eval", str(run), "--max-new-tokens", "2"],
            "chat": ["chat", str(run)]}[command]
    return runner.invoke(app, args, input="")


def truncate(file: Path, size: int | None = None) -> Path:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2 if size is None else size])
    return file


def delete(path: Path) -> Path:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return path


def write_payload(file: Path, marker: Path, legacy: bool = False) -> Path:
    if legacy:  # a plain pickle, as an attacker would write it: no torch zip archive around it
        file.write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload(marker)}))
    else:
        torch.save({"model.embed_tokens.weight": Payload(marker)}, file)
    return file


def _swap_for_payload(directory: Path, weights: str, bin_name: str, marker: Path, legacy: bool = False) -> Path:
    (directory / weights).unlink()
    return write_payload(directory / bin_name, marker, legacy)


# Each damage returns (the file or directory the message must name, words the message must contain).
DAMAGES = {
    "adapter truncated": ("lora", lambda run, _: (
        truncate(run / "adapter" / "adapter_model.safetensors"), "truncated")),
    "adapter emptied": ("lora", lambda run, _: (
        truncate(run / "adapter" / "adapter_model.safetensors", 0), "truncated or not a safetensors file")),
    "adapter deleted": ("lora", lambda run, _: (delete(run / "adapter" / "adapter_model.safetensors"), "missing")),
    "adapter config deleted": ("lora", lambda run, _: (delete(run / "adapter" / "adapter_config.json"), "missing")),
    "adapter dir deleted": ("lora", lambda run, _: (delete(run / "adapter"), "missing")),
    "adapter as malicious pickle": ("lora", lambda run, marker: (
        _swap_for_payload(run / "adapter", "adapter_model.safetensors", "adapter_model.bin", marker),
        "would run code")),
    "base truncated": ("lora", lambda run, _: (truncate(run.parent / "base" / "model.safetensors"), "truncated")),
    "base weights deleted": ("lora", lambda run, _: (
        delete(run.parent / "base" / "model.safetensors").parent, "no weights file")),
    "base as malicious pickle": ("lora", lambda run, marker: (
        _swap_for_payload(run.parent / "base", "model.safetensors", "pytorch_model.bin", marker), "would run code")),
    "base as malicious legacy pickle": ("lora", lambda run, marker: (
        _swap_for_payload(run.parent / "base", "model.safetensors", "pytorch_model.bin", marker, legacy=True),
        "more than tensors")),
    "model truncated": ("full", lambda run, _: (truncate(run / "model" / "model.safetensors"), "truncated")),
    "model as malicious pickle": ("full", lambda run, marker: (
        _swap_for_payload(run / "model", "model.safetensors", "pytorch_model.bin", marker), "would run code")),
    "model config deleted": ("full", lambda run, _: (delete(run / "model" / "config.json"), "missing")),
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.slow
def test_damaged_weights_stop_merge_eval_and_chat_with_one_message(damage, trained, tmp_path):
    kind, apply = DAMAGES[damage]
    marker = tmp_path / "payload-ran"
    for command in COMMANDS:
        if command == "merge" and kind == "full":
            continue  # a full run has nothing to merge (refused before any file is read)
        where = tmp_path / command
        where.mkdir()
        run = copy_run(trained, kind, where)
        named, words = apply(run, marker)
        result = invoke(command, run)
        assert result.exit_code == 2, f"{command}: {result.output}"
        assert isinstance(result.exception, SystemExit), f"{command}: {result.exception!r}"  # not a crash
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
        assert str(named) in result.output and words in result.output, result.output
        assert not (where / "merged").exists()
    assert not marker.exists()  # the pickle payload never ran


def test_an_unfinished_run_is_refused_with_its_status(trained, tmp_path):
    run = copy_run(trained, "full", tmp_path)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({"status": "interrupted", "resume_command": "finetune train r --resume",
                                              **{k: v for k, v in info.items() if k not in ("artifact", "status")}}))
    result = invoke("eval", run)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "no final weights (run.json status: interrupted)" in result.output
    assert "finetune train r --resume" in result.output


def test_plain_tensor_pickles_still_load(tiny_model_dir, tmp_path):
    """The pickle checks refuse code, not the format: zip and legacy torch.save files of tensors pass."""
    from safetensors.torch import load_file

    from finetune.models.weights import check_model_dir

    state = load_file(tiny_model_dir / "model.safetensors")
    for legacy in (False, True):
        model = tmp_path / f"legacy-{legacy}"
        shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
        torch.save(state, model / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        check_model_dir(model)


def test_the_bitsandbytes_kernels_notice_alone_is_dropped(caplog):
    """bitsandbytes logs it on import when `kernels` is missing (peft imports bitsandbytes); others still show."""
    import finetune.cli  # noqa: F401 - importing it installs the filter

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def assert_one_clean_error(done: subprocess.CompletedProcess, names: str) -> None:
    assert done.returncode == 2, done.stderr
    for noise in ("bitsandbytes", "kernels", "gemm_4bit", "Traceback", "Warning"):
        assert noise not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: {names}") and done.stderr.count("error:") == 1, done.stderr
    assert "\n\n" not in done.stderr.strip(), done.stderr  # one paragraph


@pytest.mark.slow
def test_user_errors_print_one_clean_message_and_nothing_else(tmp_path, tiny_model_dir):
    assert_one_clean_error(_cli("validate", "missing.yaml", cwd=tmp_path), "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model:\n  name_or_path: x\nbogus: 1\n")
    assert_one_clean_error(_cli("train", "bad.yaml", cwd=tmp_path), "bad.yaml")
    # A recipe that passes validation, so train imports the training libraries (peft, hence bitsandbytes) first.
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    recipe = {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": "prompts.jsonl"},
              "method": {"name": "lora"}, "train": {"output_dir": str(tmp_path / "run")}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(recipe))
    done = _cli("train", "lora.yaml", cwd=tmp_path)
    assert_one_clean_error(done, "")
    assert "prompts.jsonl:1" in done.stderr
