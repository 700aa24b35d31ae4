"""Where benchmark results go: the `benchmarks` entry of eval.json and a section of eval.md (beside what the task
evaluation wrote there, which stays), and the model card's model-index metadata as the Hugging Face hub renders it."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.eval.bench.compare import Change
from finetune.paths import write_atomic

#: The heading that starts the benchmarks section of eval.md; the task evaluation's table comes before it.
HEADING = "### Benchmarks (lm-evaluation-harness, base vs tuned)"
HARNESS_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


def table(changes: list[Change]) -> str:
    """One row per task metric: base, tuned, the change and its standard error."""
    lines = ["| task | metric | rows | base | tuned | change | ± stderr |", "|---|---|---|---|---|---|---|"]
    for c in changes:
        def cell(value, sign=""):
            return "-" if value is None else f"{value:{sign}.4f}"
        lines.append(f"| {c.task} | {c.metric.replace(',none', '').replace(',', ' / ')} | {c.n or '-'} | "
                     f"{cell(c.base)} | {cell(c.tuned)} | {cell(c.delta, '+')} | {cell(c.delta_stderr)} |")
    return "\n".join(lines)


def section(changes: list[Change], settings: dict, gate: dict) -> str:
    shots = "the task's default" if settings["num_fewshot"] is None else settings["num_fewshot"]
    limit = "every row" if settings["limit"] is None else f"the first {settings['limit']} rows"
    lines = [HEADING, "", f"Same rows, seed {settings['seed']} and few-shot count ({shots}) for both; {limit} of each "
             "task. Standard errors of a change are paired per row where lm-eval scores rows.", "", table(changes)]
    if gate["max_regression"] is not None:
        verdict = "passed" if gate["passed"] else "FAILED: " + ", ".join(gate["regressions"])
        lines += ["", f"Gate: no 0-1 score may drop by more than {gate['max_regression']}: {verdict}."]
    return "\n".join(lines)


def write(out_dir: Path, record: dict, markdown: str) -> None:
    """eval.json's `benchmarks` entry and eval.md's benchmarks section replaced; the rest of both kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path, md_path = out_dir / "eval.json", out_dir / "eval.md"
    data = json.loads(data_path.read_text()) if data_path.is_file() else {}
    write_atomic(data_path, json.dumps({**data, "benchmarks": record}, indent=2) + "\n")
    kept = task_part(md_path.read_text()) if md_path.is_file() else ""
    write_atomic(md_path, (kept + "\n\n" if kept else "") + markdown + "\n")


def task_part(markdown: str) -> str:
    """eval.md without its benchmarks section."""
    return markdown.split(HEADING)[0].strip()


def benchmarks_part(markdown: str) -> str:
    """eval.md's benchmarks section ('' when it has none)."""
    return HEADING + markdown.split(HEADING, 1)[1].rstrip() if HEADING in markdown else ""


def model_index(name: str, record: dict) -> list[dict]:
    """The tuned model's scores as model-index entries (huggingface_hub builds the layout the hub renders)."""
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index

    results = []
    for change in record.get("changes", []):
        task = record["tasks"].get(change["task"], {})
        metric, _, filter_name = change["metric"].partition(",")
        results.append(EvalResult(
            task_type="text-generation", dataset_type=task.get("dataset", change["task"]),
            dataset_name=change["task"], dataset_config=task.get("config"), dataset_split=task.get("split"),
            dataset_args={"num_few_shot": task["num_fewshot"]} if task.get("num_fewshot") is not None else None,
            metric_type=metric, metric_value=round(change["tuned"], 4),
            metric_name=metric if filter_name in ("", "none") else f"{metric} ({filter_name})",
            source_name="lm-evaluation-harness", source_url=HARNESS_URL))
    return eval_results_to_model_index(name, results) if results else []
