"""The console of a run: one progress line per logging step (no printed log dicts), evaluations as a table, and the
libraries' bars for internal passes only with --debug."""

import json

from typer.testing import CliRunner

from finetune.cli import app

runner = CliRunner()


def test_progress_lines_and_eval_table_instead_of_log_dicts(write_recipe, tmp_path, capfd):
    path = write_recipe(data={"eval_fraction": 0.125}, train={"max_steps": 3, "eval_steps": 3})
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    printed = result.output + "".join(capfd.readouterr())
    lines = [line for line in printed.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all(" loss " in line and " lr " in line and "tok/s" in line and "ETA" in line and "peak" in line
               for line in lines)
    assert "{'loss'" not in printed and "'train_runtime'" not in printed
    assert "held-out evaluation at step 3" in printed and "│ loss " in printed
    assert "Loading weights" not in printed  # transformers' bar for loading the checkpoint
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]  # unchanged by the console


def test_internal_passes_show_their_bars_only_with_debug(write_recipe, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("FINETUNE_DEBUG", "")  # --debug sets it for the process: unset again after this test
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Count from {i}", "chosen": f"{i} {i + 1}",
                                         "rejected": f"{i} {i - 1}"}) + "\n" for i in range(3, 11)))
    path = write_recipe(data={"train": str(pairs)}, objective={"name": "dpo"}, train={"max_steps": 1})
    quiet = runner.invoke(app, ["train", str(path)])
    assert quiet.exit_code == 0, quiet.output
    printed = quiet.output + "".join(capfd.readouterr())
    assert "reference: computing the log-probabilities of 8 training rows" in printed
    assert "Computing reference log probs" not in printed
    # data.cache off: a cached entry would also hold the first run's reference log-probabilities, and TRL reuses them
    loud = runner.invoke(app, ["train", str(path), "--overwrite", "--debug", "--set", "data.cache=false"])
    assert loud.exit_code == 0, loud.output
    assert "Computing reference log probs" in loud.output + "".join(capfd.readouterr())
