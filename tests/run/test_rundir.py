"""Nothing lost, nothing silent: run dirs that are never clobbered, one process per run dir, checkpoints complete or
skipped, a graceful Ctrl-C, divergence stopped, and resume against a changed recipe."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app
from finetune.run import rundir
from finetune.run.report import read_metrics

runner = CliRunner()


def train(*args):
    return runner.invoke(app, ["train", *map(str, args)])


def said(result) -> str:
    """The output without the line breaks rich puts into long paths and messages."""
    return "".join(result.output.split())


def logged_steps(run):
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_overwrite_never_deletes_what_finetune_did_not_write(write_recipe, tmp_path, monkeypatch):
    recipe = write_recipe()
    mine = tmp_path / "mywork"
    (mine / "thesis").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (mine / "thesis" / "chapter1.tex").write_text("mine too")
    result = train(recipe, "--output", mine, "--overwrite")
    assert result.exit_code == 2
    assert "notes.txt" in result.output and "Nothing was deleted" in result.output
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "thesis" / "chapter1.tex").exists()

    monkeypatch.chdir(tmp_path / "mywork" / "thesis")
    for where in (".", "..", tmp_path):  # the current directory and its parents
        result = train(recipe, "--output", where, "--overwrite")
        assert result.exit_code == 2 and "cannot be a run directory" in result.output, where
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    result = train(recipe, "--output", tmp_path / "home", "--overwrite")
    assert result.exit_code == 2 and "cannot be a run directory" in result.output
    assert (mine / "thesis" / "chapter1.tex").exists()

    result = train(recipe, "--output", mine / "notes.txt")
    assert result.exit_code == 2 and "is a file, not a directory" in result.output
    assert "Traceback" not in result.output


def test_overwrite_replaces_a_run_dir_finetune_made(write_recipe, tmp_path):
    recipe = write_recipe(train={"max_steps": 2})
    assert train(recipe).exit_code == 0
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    (run / "stale.txt").write_text("from the old run")
    assert train(recipe, "--overwrite").exit_code == 0
    assert not (run / "stale.txt").exists() and logged_steps(run) == [1, 2]


@pytest.mark.slow
def test_a_second_process_is_refused_and_a_killed_one_leaves_no_stale_lock(write_recipe, tmp_path):
    recipe = write_recipe(train={"max_steps": 2})
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from finetune.run import rundir; "
        f"rundir.claim(Path({str(run)!r}), {{}}, False, False, print); print('claimed', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        for extra in ([], ["--overwrite"], ["--resume"]):
            result = train(recipe, *extra)
            assert result.exit_code == 2, extra
            assert f"in use by another finetune process (pid {holder.pid})" in result.output
        assert (run / "run.json").exists()  # the holder's claim is intact
    finally:
        holder.kill()
        holder.wait()
    result = train(recipe, "--overwrite")  # the kernel released the killed process's lock
    assert result.exit_code == 0, result.output


def test_resume_skips_an_incomplete_checkpoint_and_logs_each_step_once(write_recipe, tmp_path):
    recipe = write_recipe(train={"max_steps": 4, "save_steps": 2, "save_total_limit": 3})
    assert train(recipe).exit_code == 0
    run = tmp_path / "run"
    newest = run / "checkpoints" / "checkpoint-4"
    assert rundir.incomplete_reason(newest) is None
    with (newest / "optimizer.pt").open("r+b") as handle:  # as a process killed mid-write leaves it
        handle.truncate(100)
    assert "optimizer.pt has 100 bytes" in rundir.incomplete_reason(newest)

    result = train(recipe, "--resume", "--set", "train.max_steps=6")
    assert result.exit_code == 0, result.output
    assert "removedincomplete" in said(result) and "checkpoint-4:optimizer.pthas100bytes" in said(result)
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]  # steps 3-4 ran again and are logged once
    info = json.loads((run / "run.json").read_text())
    assert info["resumes"] == [{"checkpoint": "checkpoint-2", "step": 2,
                                "changed": {"train.max_steps": {"was": 4, "now": 6}}}]
    assert rundir.incomplete_reason(run / "checkpoints" / "checkpoint-6") is None


def test_a_failed_checkpoint_write_names_the_path_and_keeps_the_previous_one(write_recipe, tmp_path, monkeypatch):
    recipe = write_recipe(train={"max_steps": 6, "save_steps": 2, "save_total_limit": 3})
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # what torch's zip writer raises when the disk fills mid-file
        if "checkpoint-4" in str(f):
            with open(f, "wb") as handle:
                handle.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 908224 vs 908112")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    result = train(recipe)
    assert result.exit_code == 2
    run = tmp_path / "run"
    message = " ".join(result.output.split())
    assert f"could not write {run / 'checkpoints' / 'checkpoint-4'}" in message
    assert "checkpoint-2 is complete and untouched" in message and "free on that disk" in message
    assert "Traceback" not in result.output
    assert not (run / "checkpoints" / "checkpoint-4").exists()
    assert rundir.incomplete_reason(run / "checkpoints" / "checkpoint-2") is None
    assert json.loads((run / "run.json").read_text())["status"] == "failed"

    monkeypatch.setattr(torch, "save", real_save)  # room made
    result = train(recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]


def _start(recipe):
    # SIGINT as a terminal's foreground process has it, even when the test runner was started in the background
    # of a script (where the shell makes it, and so every child, ignore SIGINT).
    return subprocess.Popen([sys.executable, "-m", "finetune.cli", "train", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(ready, process, limit_s=120):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and process.poll() is None:
        if ready():
            return
        time.sleep(0.01)
    raise AssertionError(f"the run never got there: {process.communicate()}")


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_resume_continues(write_recipe, tmp_path):
    recipe = write_recipe(train={"max_steps": 400, "save_steps": 1000})
    run = tmp_path / "run"
    process = _start(recipe)
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len(logged_steps(run)) >= 6, process)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output
    assert "Traceback" not in output
    info = json.loads((run / "run.json").read_text())
    step = info["stopped_at_step"]
    assert info["status"] == "interrupted" and 6 <= step < 400
    assert rundir.incomplete_reason(run / "checkpoints" / f"checkpoint-{step}") is None
    assert not (run / "model").exists()
    command = info["resume_command"]
    assert command in " ".join(output.split()) and command.endswith("--resume")

    result = train(recipe, "--resume", "--set", f"train.max_steps={step + 3}")
    assert result.exit_code == 0, result.output
    assert logged_steps(run) == list(range(1, step + 4))
    summaries = [r for r in read_metrics(run / "metrics.jsonl") if "train_loss" in r]
    assert len(summaries) == 1 and summaries[0]["step"] == step + 3  # the interrupted segment's is dropped
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and "stopped_at_step" not in info and "resume_command" not in info


@pytest.mark.slow
@pytest.mark.parametrize("stop, exit_code, status", [(signal.SIGINT, 130, "interrupted"),
                                                     (signal.SIGKILL, -signal.SIGKILL, "running")],
                         ids=["ctrl-c", "kill-9"])
def test_a_run_stopped_before_its_first_step_is_started_again_without_overwrite(write_recipe, tmp_path, stop,
                                                                                 exit_code, status):
    recipe = write_recipe(train={"max_steps": 400})
    run = tmp_path / "run"
    process = _start(recipe)
    _wait_for(lambda: (run / "run.json").exists(), process)  # claimed; data and model still loading
    process.send_signal(stop)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == exit_code, output  # Ctrl-C: 130, no traceback; SIGKILL: no word at all
    assert "Traceback" not in output
    assert json.loads((run / "run.json").read_text())["status"] == status  # SIGKILL leaves "running"
    result = train(recipe, "--set", "train.max_steps=1")  # nothing to keep: started again without --overwrite
    assert result.exit_code == 0, result.output
    assert f"stoppedbeforeitsfirststep(status{status}" in said(result)
    (run / "metrics.jsonl").write_text("")  # a run that trained has something to keep: asked for, as before
    (run / "model").rename(run / "kept")
    assert "pass--overwrite" in said(train(recipe))


def test_a_second_signal_stops_at_once_and_one_signal_delivered_twice_does_not():
    from transformers import TrainerControl, TrainerState

    from finetune.run.guards import StopOnSignal

    stop = StopOnSignal(log=lambda *_: None)
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)  # the same SIGTERM, once from the process group and once passed on
    control = TrainerControl()
    stop.on_step_end(None, TrainerState(), control)
    assert stop.requested == "SIGTERM"
    assert control.should_save and control.should_training_stop
    stop._at -= 2 * StopOnSignal.SAME_EVENT_S
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


@pytest.mark.parametrize("logging_steps", [1, 5])
def test_a_diverging_run_stops_and_saves_nothing_non_finite(write_recipe, tmp_path, logging_steps):
    # Every checkpoint step is checked even when the loss is not logged there (logging_steps 5).
    recipe = write_recipe(train={"learning_rate": 1e30, "max_steps": 8, "save_steps": 1, "save_total_limit": 10,
                                 "logging_steps": logging_steps})
    result = train(recipe)
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "training diverged at step 2" in message and "train.learning_rate 1e+30 is too high" in message
    run = tmp_path / "run"
    assert not (run / "model").exists()
    checkpoints = rundir.checkpoint_dirs(run / "checkpoints")
    assert [c.name for c in checkpoints] == ["checkpoint-1"]
    for checkpoint in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "diverged" and info["diverged_at_step"] == 2


def test_a_collapsed_run_is_reported(write_recipe, tmp_path):
    recipe = write_recipe(train={"learning_rate": 1e4, "max_steps": 6})
    result = train(recipe)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "collapsed" in result.output
    warnings = json.loads((tmp_path / "run" / "run.json").read_text())["warnings"]
    assert len(warnings) == 1 and "gradient norm has been exactly 0" in warnings[0]


def test_resume_refuses_changes_it_cannot_honour_before_writing_anything(write_recipe, tmp_path):
    recipe = write_recipe(method={"name": "lora", "r": 4}, train={"max_steps": 2, "save_steps": 2})
    assert train(recipe).exit_code == 0
    run = tmp_path / "run"
    saved = (run / "recipe.yaml").read_bytes(), (run / "run.json").read_bytes(), (run / "metrics.jsonl").read_bytes()
    full = write_recipe(name="full.yaml", train={"max_steps": 2, "save_steps": 2, "learning_rate": 1e-2})
    result = train(full, "--resume")
    assert result.exit_code == 2
    assert "method.name: 'lora' in the run, 'full' now" in result.output
    assert "train.learning_rate: 0.001 in the run, 0.01 now" in result.output
    assert "method.r" not in result.output  # one line for the method, not one per option
    assert ((run / "recipe.yaml").read_bytes(), (run / "run.json").read_bytes(),
            (run / "metrics.jsonl").read_bytes()) == saved


def test_a_longer_resumed_run_follows_the_schedule_of_a_run_of_that_length(write_recipe, tmp_path):
    whole = write_recipe(name="whole.yaml", train={"max_steps": 8, "lr_scheduler": "cosine",
                                                  "output_dir": str(tmp_path / "whole")})
    assert train(whole).exit_code == 0
    short = write_recipe(name="short.yaml", train={"max_steps": 4, "save_steps": 4, "lr_scheduler": "cosine"})
    assert train(short).exit_code == 0
    result = train(short, "--resume", "--set", "train.max_steps=8")
    assert result.exit_code == 0, result.output
    assert "learning-rate schedule is rebuilt" in " ".join(result.output.split())
    rates = {name: {r["step"]: r["lr"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "lr" in r}
             for name in ("whole", "run")}
    assert rates["run"][3] != pytest.approx(rates["whole"][3])  # the first 4 steps ran on the shorter curve
    for step in range(5, 9):
        assert rates["run"][step] == pytest.approx(rates["whole"][step], rel=1e-6), step
    assert os.path.exists(tmp_path / "run" / "model" / "model.safetensors")


def test_overwrite_refuses_to_delete_the_runs_own_inputs(write_recipe, tmp_path):
    # held-out rows, so that held_out.jsonl holds rows (an empty data file is refused before any run-dir check)
    recipe = write_recipe(train={"max_steps": 2}, data={"eval_fraction": 0.25})
    assert train(recipe).exit_code == 0
    run = tmp_path / "run"
    before = sorted(p.name for p in run.iterdir())
    for key, value in (("model.name_or_path", run / "model"), ("data.train", run / "held_out.jsonl")):
        result = train(recipe, "--overwrite", "--set", f"{key}={value}")
        assert result.exit_code == 2
        assert "frominside" in said(result) and "Nothingwasdeleted" in said(result)
    assert sorted(p.name for p in run.iterdir()) == before


def test_resume_at_or_past_max_steps_takes_no_extra_step(write_recipe, tmp_path):
    recipe = write_recipe(train={"max_steps": 4, "save_steps": 2})
    assert train(recipe).exit_code == 0
    run = tmp_path / "run"
    import shutil

    shutil.rmtree(run / "model")  # as a final save that failed on a full disk leaves it
    result = train(recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert (run / "model" / "model.safetensors").exists()
    assert json.loads((run / "run.json").read_text())["steps"] == 4
    assert logged_steps(run) == [1, 2, 3, 4] and not (run / "checkpoints" / "checkpoint-5").exists()

    result = train(recipe, "--resume", "--set", "train.max_steps=3")
    assert result.exit_code == 2 and "pasttrain.max_steps3" in said(result)


def test_a_finite_blow_up_stops_the_run(write_recipe, tmp_path):
    result = train(write_recipe(train={"learning_rate": 30.0, "max_steps": 20, "save_steps": 1,
                                       "save_total_limit": 30}))
    assert result.exit_code == 2
    assert "more than twice a uniform guess" in " ".join(result.output.split())
    run = tmp_path / "run"
    assert not (run / "model").exists()
    info = json.loads((run / "run.json").read_text())
    newest = rundir.checkpoint_dirs(run / "checkpoints")[0]
    assert info["status"] == "diverged" and rundir.checkpoint_step(str(newest)) < info["diverged_at_step"]


def test_unusable_output_paths_and_a_leftover_lock_are_handled(write_recipe, tmp_path):
    recipe = write_recipe(train={"max_steps": 2})
    (tmp_path / "notes.txt").write_text("mine")
    result = train(recipe, "--output", tmp_path / "notes.txt" / "sub")
    assert result.exit_code == 2 and "cannot use" in result.output and "Traceback" not in result.output
    leftover = tmp_path / "cut-short"
    leftover.mkdir()
    (leftover / rundir.LOCK).write_text("123\n")  # a claim cut short (full disk) leaves only the lock file
    assert train(recipe, "--output", leftover).exit_code == 0
