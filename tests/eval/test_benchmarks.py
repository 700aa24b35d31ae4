"""General benchmarks base vs tuned through lm-evaluation-harness: a local task end to end on the tiny model (train
runs it from the recipe), the regression gate's exit codes, and the refusals (no lm-eval, unknown or unreachable
tasks, bad rows)."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from finetune import deps
from finetune.cli import app
from finetune.errors import UserError
from finetune.eval.bench.compare import compare, regressions
from finetune.eval.bench.run import CHANGED_ROWS
from finetune.eval.bench.tasks import jsonl_task

ROOT = Path(__file__).resolve().parents[2]
GENERAL = ROOT / "data" / "general" / "general.jsonl"
LIMIT = 40
runner = CliRunner()


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_a_jsonl_task_names_every_bad_row_and_takes_an_answer_by_index_or_text(tmp_path):
    bad = write_rows(tmp_path / "bad.jsonl", [
        {"question": "Q?", "choices": ["a", "b"], "answer": 2}, "not json",
        {"question": "Q?", "choices": ["a", "b"], "answer": "c"}, {"question": "", "answer": "x"},
        {"question": "Q?", "choices": ["a"], "answer": 0}, {"question": "Q?", "answer": "x", "label": 1}])
    with pytest.raises(UserError) as err:
        jsonl_task(bad, "bad")
    message = str(err.value)
    for row, words in [(1, "no index"), (2, "not JSON"), (3, "none of its choices"), (4, "`question`"),
                       (5, "at least two"), (6, "unknown key")]:
        assert f"row {row}: " in message and words in message, (row, message)
    mixed = write_rows(tmp_path / "mixed.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": 0},
                                                  {"question": "Q?", "answer": "x"}])
    with pytest.raises(UserError, match="both kinds"):
        jsonl_task(mixed, "mixed")
    good = write_rows(tmp_path / "good.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": "b"}])
    config = jsonl_task(good, "good")
    copy = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert config["output_type"] == "multiple_choice" and json.loads(copy.read_text())["answer"] == 1
    generation = jsonl_task(write_rows(tmp_path / "gen.jsonl", [{"question": "Q?", "answer": "x"}]), "gen")
    assert generation["output_type"] == "generate_until" and generation["metric_list"][0]["metric"] == "exact_match"


def scores(value: float, rows: dict | None = None, better: bool = True, stderr: float | None = 0.05) -> dict:
    return {"value": value, "n": len(rows or {}) or 10, "higher_is_better": better, "stderr": stderr, "rows": rows}


def test_changes_pair_rows_and_the_gate_takes_only_drops_of_0_1_scores_past_the_bound():
    base = {"mc": {"acc,none": scores(0.75, {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.0})},
            "lm": {"perplexity,none": scores(10.0), "error,none": scores(0.2, better=False)}}
    tuned = {"mc": {"acc,none": scores(0.5, {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0})},
             "lm": {"perplexity,none": scores(30.0), "error,none": scores(0.21, better=False)}}
    changes = {c.metric: c for c in compare(tuned, base)}
    acc = changes["acc,none"]
    assert acc.delta == pytest.approx(-0.25) and acc.paired
    assert acc.delta_stderr == pytest.approx(0.25)  # differences 0, -1, 0, 0: sd 0.5 over sqrt(4)
    assert not changes["perplexity,none"].gated and changes["perplexity,none"].delta_stderr == pytest.approx(0.0707,
                                                                                                             abs=1e-4)
    assert changes["error,none"].regression == pytest.approx(0.01)  # lower is better: a rise is the regression
    assert [c.metric for c in regressions(list(changes.values()), 0.02)] == ["acc,none"]
    assert [c.metric for c in regressions(list(changes.values()), 0.005)] == ["acc,none", "error,none"]
    assert regressions(list(changes.values()), None) == [] and regressions(list(changes.values()), 0.25) == []


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_model_dir, train_file) -> Path:
    """A tiny full fine-tuning run whose recipe asks for the demo's general benchmark (its first rows)."""
    tmp = tmp_path_factory.mktemp("bench")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir), "gradient_checkpointing": False},
        "data": {"train": str(train_file), "max_length": 64}, "method": {"name": "full"},
        "train": {"learning_rate": 1e-2, "max_steps": 4, "batch_size": 4, "logging_steps": 1, "warmup_ratio": 0.0,
                  "output_dir": str(tmp / "run")},
        "eval": {"benchmarks": {"tasks": [str(GENERAL)], "limit": LIMIT}}}))
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "### Benchmarks" in result.output
    return tmp / "run"


@pytest.mark.slow
def test_train_scores_the_recipes_benchmarks_base_vs_tuned_into_eval_and_the_card(bench_run):
    record = json.loads((bench_run / "eval.json").read_text())["benchmarks"]
    (change,) = record["changes"]
    assert change["task"] == "general" and change["metric"] == "acc,none" and change["n"] == LIMIT
    assert change["paired"] and change["gated"] and record["gate"]["passed"]
    changed = [json.loads(line) for line in (bench_run / CHANGED_ROWS).read_text().splitlines()]
    # the same LIMIT rows for both: the change is the mean of the rows that changed
    assert change["delta"] == pytest.approx(sum(r["tuned"] - r["base"] for r in changed) / LIMIT)
    assert all(r["row"] < LIMIT and r["doc"]["question"] for r in changed)
    metadata = yaml.safe_load((bench_run / "model" / "README.md").read_text().split("---")[1])
    (entry,) = metadata["model-index"][0]["results"]
    assert entry["dataset"]["name"] == "general" and entry["dataset"]["type"] == str(GENERAL)
    assert entry["metrics"][0]["type"] == "acc" and entry["metrics"][0]["value"] == round(change["tuned"], 4)
    assert "### Benchmarks" in (bench_run / "eval.md").read_text()


@pytest.mark.slow
def test_the_gate_exits_1_on_a_regression_naming_it_and_0_within_the_bound(bench_run, tmp_path):
    changed = [json.loads(line) for line in (bench_run / CHANGED_ROWS).read_text().splitlines()]
    forgotten = [r["doc"] for r in changed if r["base"] > r["tuned"]]
    assert forgotten, "the tuned tiny model lost no question its base answered: no regression to force"
    kept_rows = {r["row"] for r in changed}
    unchanged = [json.loads(line) for i, line in enumerate(GENERAL.read_text().splitlines()[:LIMIT])
                 if i not in kept_rows]
    worse = write_rows(tmp_path / "worse.jsonl", forgotten)
    result = runner.invoke(app, ["eval", str(bench_run), "--tasks", str(worse), "--max-regression", "0.02",
                                 "--output", str(tmp_path / "worse")])
    assert result.exit_code == 1, result.output
    assert "regression:" in result.output and "worse acc" in result.output and "Traceback" not in result.output
    gate = json.loads((tmp_path / "worse" / "eval.json").read_text())["benchmarks"]["gate"]
    assert gate == {"max_regression": 0.02, "passed": False, "regressions": ["worse acc,none"]}
    same = write_rows(tmp_path / "same.jsonl", unchanged)
    result = runner.invoke(app, ["eval", str(bench_run), "--tasks", str(same), "--max-regression", "0.02",
                                 "--output", str(tmp_path / "same")])
    assert result.exit_code == 0, result.output
    assert "Gate: no 0-1 score may drop by more than 0.02: passed" in result.output


@pytest.mark.slow
def test_unknown_and_unreachable_tasks_are_one_clear_error_each(bench_run, tmp_path):
    result = runner.invoke(app, ["eval", str(bench_run), "--tasks", "arc_easyy", "--output", str(tmp_path / "a")])
    assert result.exit_code == 2 and "`arc_easyy` (did you mean arc_easy" in result.output
    assert "not a task, group or tag of lm-eval" in result.output
    result = runner.invoke(app, ["eval", str(bench_run), "--tasks", "arc_easy", "--output", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert "`arc_easy`: its data could not be loaded: the Hugging Face hub cannot be reached" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "b" / "eval.json").exists()


def test_without_lm_eval_the_recipe_and_the_command_give_the_install_command(write_recipe, tmp_path, monkeypatch,
                                                                               tiny_model_dir):
    real = deps.installed
    monkeypatch.setattr(deps, "installed", lambda module: module != "lm_eval" and real(module))
    recipe = write_recipe(eval={"benchmarks": {"tasks": [str(GENERAL)]}})
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2 and "eval.benchmarks: lm-eval" in result.output
    assert "pip install 'finetune[bench]'" in result.output
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--tasks", str(GENERAL), "--output", str(tmp_path)])
    assert result.exit_code == 2 and "pip install 'finetune[bench]'" in result.output
    missing_file = write_recipe(name="missing.yaml", eval={"benchmarks": {"tasks": ["nowhere/tasks.jsonl"]}})
    monkeypatch.setattr(deps, "installed", real)
    result = runner.invoke(app, ["validate", str(missing_file)])
    assert result.exit_code == 2 and "task file `nowhere/tasks.jsonl` does not exist" in result.output


def test_the_batch_is_the_largest_power_of_two_the_plan_fits_for_the_longest_request(tiny_model_dir):
    from transformers import AutoConfig

    from finetune.plan.inference import USABLE_SHARE, eval_batch_size, forward_bytes

    config = AutoConfig.from_pretrained(tiny_model_dir)
    one = forward_bytes(config, 100, 4)
    assert forward_bytes(config, 200, 4) == pytest.approx(2 * one)  # linear in tokens: no attention matrix (SDPA)
    assert eval_batch_size(config, 100, 4, free_bytes=8.5 * one / USABLE_SHARE) == 8
    assert eval_batch_size(config, 100, 4, free_bytes=7.9 * one / USABLE_SHARE) == 4
    assert eval_batch_size(config, 100, 4, free_bytes=0.5 * one) == 1  # one sequence is the floor
    assert eval_batch_size(config, 100, 4, free_bytes=1e15, largest=64) == 64


def test_a_task_evaluation_keeps_the_benchmarks_of_the_same_weights(tmp_path):
    from finetune.eval.bench.report import HEADING
    from finetune.eval.targets import Target, write_report

    (tmp_path / "eval.json").write_text(json.dumps({"benchmarks": {"gate": {"passed": True}}}))
    (tmp_path / "eval.md").write_text(f"| old task table |\n\n{HEADING}\n\n| bench |\n")
    write_report("model", Target("model", None, None, tmp_path), {"results": {"model": {"loss": 1.5}}}, ["loss"],
                 log=lambda *_: None)
    assert json.loads((tmp_path / "eval.json").read_text()) == {"results": {"model": {"loss": 1.5}},
                                                                "benchmarks": {"gate": {"passed": True}}}
    text = (tmp_path / "eval.md").read_text()
    assert "old task table" not in text and "1.5000" in text and text.rstrip().endswith(f"{HEADING}\n\n| bench |")


def test_task_and_benchmark_flags_are_not_mixed_in_one_command(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path), "--tasks", str(GENERAL), "--compare-base"])
    assert result.exit_code == 2 and "--compare-base: these score the run's task" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path), "--max-regression", "0.02"])
    assert result.exit_code == 2 and "--max-regression: benchmark options: they go with --tasks" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path), "--benchmarks"])
    assert result.exit_code == 2 and "no eval.benchmarks to run; name the tasks with --tasks" in result.output


@pytest.mark.slow
def test_an_lm_eval_task_yaml_with_local_data_files_runs_offline(bench_run, tmp_path):
    task = tmp_path / "capitals.yaml"
    task.write_text(yaml.safe_dump({
        "task": "capitals", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(GENERAL)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    result = runner.invoke(app, ["eval", str(bench_run), "--tasks", str(task), "--limit", "8",
                                 "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (change,) = json.loads((tmp_path / "out" / "eval.json").read_text())["benchmarks"]["changes"]
    assert change["task"] == "capitals" and change["n"] == 8 and change["base"] is not None
