"""Model cards: a README.md in every saved model, adapter and merged directory, with Hugging Face card metadata, so
the directory can be uploaded as it is and says what made it.

Everything comes from the run dir (recipe.yaml, run.json, metrics.jsonl, eval.md), so training, `finetune merge`
and `finetune eval` write the same card, the latter two with what they add (the merge, the evaluation table).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from finetune.models.registry import resolvable_base
from finetune.paths import write_atomic

#: The method options a card lists (the rest are defaults a reader rarely needs).
KEY_OPTIONS = ("r", "alpha", "quantize", "use_dora", "use_rslora", "init", "rank", "optim_bits", "layerwise",
               "activated_layers", "interval_steps")


def name_adapter_base(adapter_dir: Path, base: str) -> None:
    """Point adapter_config.json at a base others can resolve, not this machine's cache (run.json keeps that path)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_model_card(run_dir: Path, directory: Path, merged: bool = False) -> Path:
    """Write `directory`/README.md for a run's weights (the run's own model/adapter dir, or a merged copy)."""
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    info = json.loads((run_dir / "run.json").read_text())
    base = resolvable_base(info.get("base_model", recipe.get("model", {}).get("name_or_path", "")))
    method, objective = recipe.get("method", {}), recipe.get("objective", {"name": "sft"})
    adapter = info.get("artifact") == "adapter" and not merged
    metadata = {"base_model": base, "library_name": "peft" if adapter else "transformers",
                "pipeline_tag": "text-generation",
                "tags": ["finetune", method.get("name", ""), objective.get("name", "sft")]
                + (["merged"] if merged else [])}
    index = _model_index(run_dir)
    if index:
        metadata["model-index"] = index
    options = ", ".join(f"{k}={method[k]}" for k in KEY_OPTIONS if k in method)
    losses = _final_losses(run_dir / "metrics.jsonl")
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "",
             f"# {run_dir.name}", "",
             f"Fine-tuned from {_link(base)} with finetune"
             + (" (the LoRA adapter merged into the base weights)." if merged else "."), "",
             "| | |", "|---|---|",
             f"| base model | `{base}` |",
             f"| method | {method.get('name', '')}" + (f" ({options})" if options else "") + " |",
             f"| objective | {objective.get('name', 'sft')}" + (f" (beta {objective['beta']})" if "beta" in objective
                                                               else "") + " |",
             *[f"| data | `{source['source']}`: {source['rows']} rows |" for source in info.get("data", [])],
             f"| steps | {info.get('steps', '')} |",
             *[f"| final {name} | {value:.4f} |" for name, value in losses.items()],
             "", "## Reproduce", "", "```bash", _command(run_dir, recipe), "```", ""]
    evaluation = run_dir / "eval.md"
    if evaluation.exists():
        lines += ["## Evaluation (`finetune eval`)", "", evaluation.read_text().strip(), ""]
    path = directory / "README.md"
    write_atomic(path, "\n".join(lines))  # a card cut short by a kill would be uploaded as it is
    return path


def _model_index(run_dir: Path) -> list[dict]:
    """The benchmark scores of eval.json (finetune eval --benchmarks) as the hub's model-index metadata."""
    path = run_dir / "eval.json"
    record = json.loads(path.read_text()).get("benchmarks") if path.is_file() else None
    if not record:
        return []
    from finetune.eval.bench.report import model_index

    return model_index(run_dir.name, record)


def _link(base: str) -> str:
    """A hub id as a link to its page; a local path as code."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists():
        return f"[{base}](https://huggingface.co/{base})"
    return f"`{base}`"


def _final_losses(metrics: Path) -> dict[str, float]:
    found = {}
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            for key, name in (("loss", "train loss"), ("eval_loss", "eval loss")):
                if isinstance(record.get(key), (int, float)):
                    found[name] = record[key]
    return found


def _command(run_dir: Path, recipe: dict) -> str:
    """The run again from its resolved recipe (saved beside the weights as recipe.yaml)."""
    return shlex.join(["finetune", "train", str(run_dir / "recipe.yaml"), "--output", f"{run_dir}-again"])
