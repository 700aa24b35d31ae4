"""`finetune eval RUN --benchmarks` and the end of `finetune train` with `eval.benchmarks`: the base and the tuned
model through the same lm-eval tasks, the change of each score, the regression gate, and the report."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import UserError
from finetune.eval.bench.compare import compare, regression_message, regressions
from finetune.eval.bench.report import section, write
from finetune.eval.bench.tasks import (
    BenchTask,
    check_data,
    check_names,
    require_lm_eval,
    resolve_tasks,
    task_manager,
)
from finetune.paths import write_atomic

#: Rows whose score changed between base and tuned, beside eval.json: what tuning broke or fixed, question by
#: question.
CHANGED_ROWS = "benchmark_rows_changed.jsonl"


class Regression(Exception):
    """A gated score dropped by more than max_regression: a finding about the model, so exit 1, not 2."""


def checked_tasks(settings) -> tuple[list[BenchTask], object]:
    """The tasks resolved, named and their data reachable, with the TaskManager that loads them: everything that
    can be refused before a model loads (or before a run trains)."""
    require_lm_eval()
    tasks = resolve_tasks(settings.tasks)
    manager = task_manager(tasks)
    check_names(tasks, manager)
    check_data(tasks, manager)
    return tasks, manager


def run_benchmarks(target: str, settings, output: Path | None = None, log=print) -> dict:
    """Score every candidate of `target` (a run: its base, then the tuned model; a model: itself), write the report,
    and raise Regression when the gate fails (after the report is written)."""
    from finetune.eval.targets import checked_candidates, refresh_card, resolve_target

    where = resolve_target(target, output)
    with_base = where.base_path is not None
    if settings.max_regression is not None and not with_base:
        raise UserError(f"max_regression compares a run with its base model; {target} is a model, not a finished "
                        "run, so there is no base to compare with")
    tasks, manager = checked_tasks(settings)
    raw = {}
    for name, (model_path, adapter) in checked_candidates(where, with_base).items():
        log(f"benchmarks: {name}: {model_path}" + (f" with the adapter {adapter}" if adapter else ""))
        raw[name] = _score_one(model_path, adapter, where.tokenizer_source, tasks, manager, settings, log)
    from finetune.eval.bench.harness import scores

    tuned = raw["tuned" if with_base else "model"]
    tuned_scores, base_scores = scores(tuned), scores(raw["base"]) if with_base else None
    changes = compare(tuned_scores, base_scores)
    found = regressions(changes, settings.max_regression)
    gate = {"max_regression": settings.max_regression, "passed": not found,
            "regressions": [f"{c.task} {c.metric}" for c in found]}
    record = {"settings": settings.model_dump(mode="json"), "tasks": _task_info(tuned, tasks),
              "changes": [c.record() for c in changes], "gate": gate, "lm_eval": _version()}
    markdown = section(changes, record["settings"], gate)
    write(where.out_dir, record, markdown)
    if with_base:
        _write_changed_rows(where.out_dir / CHANGED_ROWS, base_scores, tuned_scores, tuned, changes)
    refresh_card(target, where.out_dir)
    log(markdown)
    log(f"wrote {where.out_dir / 'eval.json'} and {where.out_dir / 'eval.md'}")
    if found:
        raise Regression(regression_message(found, settings.max_regression))
    return record


def _score_one(model_path: str, adapter, tokenizer_path: str, tasks, manager, settings, log) -> dict:
    from finetune.eval.bench.harness import evaluate_model, planned_lm
    from finetune.eval.targets import load_for_eval

    model, tokenizer = load_for_eval(model_path, adapter, tokenizer_path)
    lm = planned_lm(_on_accelerator(model), tokenizer, settings.batch_size, log)
    return evaluate_model(lm, tasks, manager, settings)  # the model is released with this frame


def _on_accelerator(model):
    """On a CUDA GPU in bf16 where it has it (as training computes), else where it is (a CPU computes in fp32)."""
    import torch

    if not torch.cuda.is_available():
        return model
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return model.to("cuda", dtype=dtype)


def _task_info(result: dict, tasks: list[BenchTask]) -> dict[str, dict]:
    """task -> the data set it scored (a hub id, or the JSONL file as named), its config, split and shots."""
    files = {task.load["task"]: task.dataset for task in tasks if isinstance(task.load, dict)}
    info = {}
    for name in result["results"]:
        config = result.get("configs", {}).get(name, {})
        dataset = files.get(name) or config.get("dataset_path") or name
        info[name] = {"dataset": dataset, "config": config.get("dataset_name"), "split": config.get("test_split"),
                      "num_fewshot": result.get("n-shot", {}).get(name)}
    return info


def _write_changed_rows(path: Path, before: dict, after: dict, tuned: dict, changes) -> None:
    """`before`/`after`: base's and tuned's scores (harness.scores); `tuned`: its raw result, for the questions."""
    lines = []
    for change in (c for c in changes if c.paired and c.gated):
        rows_before = before[change.task][change.metric]["rows"]
        rows_after = after[change.task][change.metric]["rows"]
        docs = {s["doc_id"]: s.get("doc") for s in tuned.get("samples", {}).get(change.task, [])}
        for row, score in rows_after.items():
            if score != rows_before[row]:
                lines.append(json.dumps({"task": change.task, "metric": change.metric, "row": row,
                                         "base": rows_before[row], "tuned": score, "doc": docs.get(row)},
                                        default=str))
    write_atomic(path, "".join(line + "\n" for line in lines))


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def benchmark_settings(target: str, recipe: Path | None, tasks: list[str] | None, **flags):
    """The benchmarks to run: the recipe's `eval.benchmarks` (--recipe, else the run's own recipe.yaml) with
    --tasks and the other flags given over it; one error naming every bad value."""
    import yaml
    from pydantic import ValidationError

    from finetune.recipe.evaluation import BenchmarksSection

    source = recipe or Path(target) / "recipe.yaml"
    saved = {}
    if source.is_file():
        saved = ((yaml.safe_load(source.read_text()) or {}).get("eval") or {}).get("benchmarks") or {}
    if not saved and not tasks:
        raise UserError(f"{source}: no eval.benchmarks to run; name the tasks with --tasks (lm-eval task names, or "
                        "a .jsonl of rows / an lm-eval task .yaml by path)")
    values = {**saved, **({"tasks": tasks} if tasks else {}), **{k: v for k, v in flags.items() if v is not None}}
    try:
        return BenchmarksSection.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'benchmarks'}: {e['msg']}" for e in err.errors())
        raise UserError(f"benchmarks: {problems}") from None
