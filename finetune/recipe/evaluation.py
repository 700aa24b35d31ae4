"""The recipe's `eval` section: what `finetune eval` and the end of `finetune train` score beyond the task the run
trained for (finetune.eval.bench runs it)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from finetune.recipe.section import Section

#: Suffixes that make a benchmark task a local file rather than an lm-eval task name.
TASK_FILE_SUFFIXES = (".jsonl", ".json", ".yaml", ".yml")


def is_task_file(task: str) -> bool:
    return task.lower().endswith(TASK_FILE_SUFFIXES) or "/" in task or task.startswith(("~", "."))


class BenchmarksSection(Section):
    """General benchmarks scored on the base and the tuned model alike, through EleutherAI's lm-evaluation-harness
    (`pip install 'finetune[bench]'`), so a run shows what tuning cost elsewhere."""

    tasks: list[str] = Field(min_length=1)
    """lm-eval task or group names (`hellaswag`, `arc_easy`, `gsm8k`, `ifeval`, ...: their data comes from the
    Hugging Face hub or its local cache), an lm-eval task YAML file, or a JSONL file of rows: multiple choice
    `{"question", "choices", "answer"}` (answer: the index or the text of the right choice; scored by accuracy) or
    generation `{"question", "answer"}` (exact match of the greedy answer's first line)."""
    limit: int | None = Field(None, ge=1)
    """Rows per task: the first N, the same for base and tuned. None: every row."""
    num_fewshot: int | None = Field(None, ge=0)
    """Solved examples before each question. None: the task's own default (0 for a JSONL task)."""
    max_regression: float | None = Field(None, ge=0, le=1)
    """Exit 1 (a finding, not an input error) when any task's 0-1 score drops from base to tuned by more than this
    (0.02: two points of accuracy). None: report only."""
    seed: int = 1234
    """One seed for base and tuned: few-shot example choice and any sampling (lm-eval's default seed)."""
    batch_size: int | None = Field(None, ge=1)
    """Sequences per forward pass. None: the largest the memory plan fits for the longest request."""
    apply_chat_template: bool = False
    """Wrap each prompt in the model's chat template. Off by default: leaderboards score log-likelihood tasks on
    raw text; turn it on for generation tasks on a chat model."""

    @field_validator("tasks")
    @classmethod
    def _task_files_exist(cls, tasks: list[str]) -> list[str]:
        for task in tasks:
            path = Path(task).expanduser()
            if is_task_file(task) and not path.is_file():
                raise ValueError(f"task file `{task}` does not exist (a JSONL of rows or an lm-eval task YAML; "
                                 "relative paths are taken from the current directory)")
            if path.is_file() and not task.lower().endswith(TASK_FILE_SUFFIXES):
                raise ValueError(f"task file `{task}`: use a .jsonl file of rows or an lm-eval task .yaml")
        if len(set(tasks)) < len(tasks):
            raise ValueError("a task is named twice")
        return tasks


class EvalSection(Section):
    """Evaluation beyond the run's own task."""

    benchmarks: BenchmarksSection | None = None
    """Standard benchmarks base vs tuned; `finetune train` runs them at the end of the run, `finetune eval RUN
    --benchmarks` whenever asked."""
