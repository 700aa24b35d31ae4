"""Which benchmark tasks a recipe or `--tasks` names, checked before any model loads: lm-eval task names (known to
the installed harness, their data reachable), lm-eval task YAML files, and JSONL files of rows that finetune turns
into an lm-eval task (multiple choice scored by accuracy, generation by exact match)."""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from finetune import deps
from finetune.errors import UserError
from finetune.paths import cache_dir, write_atomic
from finetune.recipe.evaluation import is_task_file

#: The prompt of a JSONL task (the ARC/SciQ convention in lm-eval's own tasks); a choice or answer follows a space.
PROMPT = "Question: {{question}}\nAnswer:"
#: Tokens a JSONL generation task may answer with; the answer is its first line.
GENERATION_TOKENS = 32
#: Near names offered for an unknown one.
SUGGESTIONS = 3
#: Bad rows named in one error (the count of the rest follows).
SHOWN = 10


@dataclass(frozen=True)
class BenchTask:
    """One task as lm-eval loads it: a registered name, a YAML path, or a config built from a JSONL file."""

    spec: str  # as the recipe or --tasks names it
    load: str | dict  # what TaskManager.load takes
    dataset: str  # the data set it scores, for the model card's model-index
    registered: bool = False  # named by its lm-eval name (the harness must know it)


def require_lm_eval() -> None:
    if not deps.installed("lm_eval"):
        raise UserError("benchmarks run through EleutherAI's lm-evaluation-harness, which is not installed: "
                        f"{deps.INSTALL['lm_eval']}")


def resolve_tasks(specs: list[str]) -> list[BenchTask]:
    """Every task of `specs`, a JSONL file's rows checked (every problem named by row) and normalised."""
    tasks, stems = [], set()
    for spec in specs:
        if spec.lower().endswith((".jsonl", ".json")):
            name = Path(spec).stem
            while name in stems:  # two files of one name in different folders
                name += "_2"
            stems.add(name)
            tasks.append(BenchTask(spec, jsonl_task(Path(spec).expanduser(), name), str(spec)))
        elif is_task_file(spec):
            tasks.append(BenchTask(spec, str(Path(spec).expanduser().resolve()), str(spec)))
        else:
            tasks.append(BenchTask(spec, spec, spec, registered=True))
    return tasks


def jsonl_task(path: Path, name: str) -> dict:
    """The lm-eval task config for a JSONL file of multiple-choice or generation rows (one kind per file)."""
    rows, problems = _read_rows(path)
    kinds = {"choice" if "choices" in row else "generation" for row in rows}
    if len(kinds) > 1:
        problems.append("rows of both kinds: multiple choice (with `choices`) and generation (without); one kind "
                        "per file")
    if not rows and not problems:
        problems.append("no rows")
    if problems:
        shown = "; ".join(problems[:SHOWN]) + (f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else "")
        raise UserError(f"benchmark task {path}: {shown}. A row is " + '{"question": ..., "choices": [...], "answer": '
                        'index or text} (multiple choice) or {"question": ..., "answer": text} (generation)')
    data = _normalised_copy(path, rows)
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "doc_to_text": PROMPT, "doc_to_target": "{{answer}}"}
    if kinds == {"choice"}:
        return {**config, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    return {**config, "output_type": "generate_until",
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": GENERATION_TOKENS},
            "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                         {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": True}]}


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    rows, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"benchmark task {path}: cannot be read ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"row {number}: not JSON ({err.msg})")
            continue
        problem = _row_problem(row)
        if problem:
            problems.append(f"row {number}: {problem}")
        else:
            rows.append(_normalised(row))
    return rows, problems


def _row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        return "`question` must be non-empty text"
    unknown = sorted(set(row) - {"question", "choices", "answer"})
    if unknown:
        return f"unknown key(s) {', '.join(unknown)} (question, choices, answer)"
    answer, choices = row.get("answer"), row.get("choices")
    if choices is None:
        return None if isinstance(answer, str) and answer.strip() else "`answer` must be non-empty text"
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        return "`choices` must be a list of at least two non-empty texts"
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        return "`answer` must be the index of the right choice or its text"
    if isinstance(answer, int) and not 0 <= answer < len(choices):
        return f"`answer` {answer} is no index of its {len(choices)} choices"
    if isinstance(answer, str) and answer not in choices:
        return f"`answer` {answer!r} is none of its choices"
    return None


def _normalised(row: dict) -> dict:
    """The answer of a multiple-choice row as its index (lm-eval's doc_to_target), whichever way it was given."""
    if "choices" in row and isinstance(row["answer"], str):
        return {**row, "answer": row["choices"].index(row["answer"])}
    return row


def _normalised_copy(path: Path, rows: list[dict]) -> Path:
    """The checked rows in finetune's cache under their content hash (lm-eval reads the copy; the user's file is
    never written)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    copy = cache_dir() / "benchmarks" / f"{path.stem}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(copy, text)
    return copy


def task_manager(tasks: list[BenchTask]):
    """lm-eval's TaskManager: its index of registered tasks (about 6 s to build) only when a task is named by name."""
    return _manager(any(task.registered for task in tasks))


@functools.cache
def _manager(registered: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=registered)


def check_names(tasks: list[BenchTask], manager) -> None:
    """Every task named by name is one the installed harness knows, or one error naming the near ones."""
    known = set(manager.all_tasks)
    unknown = [task.spec for task in tasks if task.registered and task.spec not in known]
    if unknown:
        near = {name: difflib.get_close_matches(name, known, n=SUGGESTIONS) for name in unknown}
        listed = "; ".join(f"`{name}`" + (f" (did you mean {', '.join(close)}?)" if close else "")
                           for name, close in near.items())
        raise UserError(f"benchmark task {listed}: not a task, group or tag of lm-eval (`lm-eval ls tasks` lists "
                        "them), nor a file: name a .jsonl of rows or an lm-eval task .yaml by its path")


def check_data(tasks: list[BenchTask], manager) -> None:
    """Every task's data loads (lm-eval caches it for the scoring that follows); data that cannot be had (the hub
    unreachable and the data not in the local cache) is one error naming the task and the offline way instead."""
    from finetune.models.hub import offline_reason

    reason = offline_reason()  # offline: the libraries fail at once instead of retrying for half a minute
    for task in tasks:
        try:
            manager.load([task.load])
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds; each is the same finding here
            where = (f"the Hugging Face hub cannot be reached ({reason}) and its data is not in the local cache"
                     if reason else f"{type(err).__name__}: {err}")
            raise UserError(f"benchmark task `{task.spec}`: its data could not be loaded: {where}. Offline, name a "
                            "local task instead: a .jsonl of rows (question, choices, answer) or an lm-eval task "
                            "YAML with `dataset_path: json` and local `data_files`") from None
