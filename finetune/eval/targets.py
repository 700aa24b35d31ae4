"""What `finetune eval` evaluates and where its results go: a run dir (its weights, base and folding) or a bare
model; loading each candidate; and the report every evaluation writes (eval.json, eval.md, the run's card)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.data.template import ChatTemplate, chat_template
from finetune.errors import UserError
from finetune.paths import write_atomic
from finetune.run import rundir


@dataclass
class Target:
    """What to evaluate: a model dir (plus an optional adapter) and where results go."""

    model_path: str
    adapter: Path | None
    base_path: str | None  # for --compare-base
    out_dir: Path
    fold_system: bool = False  # the run's data.fold_system: prompts are folded as training folded them

    @property
    def tokenizer_source(self) -> str:
        """The tokenizer saved with the trained weights (an adapter dir keeps the one it trained with)."""
        return str(self.adapter) if self.adapter is not None else self.model_path


def run_fold_system(run_dir: Path) -> bool:
    """Whether a run folded system text into the first user turn (data.fold_system in its recipe.yaml)."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return bool((saved.get("data") or {}).get("fold_system", False))


def resolve_target(target: str, output: Path | None, command: str = "eval") -> Target:
    from finetune.models.inputs import AS_TARGET
    from finetune.models.load import resolve_model_path

    path = Path(target)
    info = rundir.finished_run(path)
    if info is not None:
        fold = run_fold_system(path)
        if info["artifact"] == "adapter":
            base = run_base_model(info)
            return Target(base, path / "adapter", base, output or path, fold)
        return Target(str(path / "model"), None, info.get("base_model_path"), output or path, fold)
    model_path = resolve_model_path(target, role=f"`finetune {command}`", expected=AS_TARGET)
    return Target(model_path, None, None, output or Path("runs") / "eval" / Path(target).name)


def refresh_card(target: str, out_dir: Path) -> None:
    """A finished run evaluated into its own dir: its weights' model card gets the evaluation table."""
    from finetune.run.card import write_model_card

    info = rundir.finished_run(Path(target))
    if info is not None and Path(out_dir).resolve() == Path(target).resolve():
        write_model_card(Path(target), Path(target) / info["artifact"])


def run_base_model(info: dict) -> str:
    """The base a run was trained on: its recorded local path, else its name resolved again (an alias fetched
    again, a hub id). A local path that is gone is refused: an adapter only fits its exact base."""
    from finetune.models.load import resolve_model_path
    from finetune.models.weights import looks_local

    path = info.get("base_model_path") or ""
    if not Path(path).exists() and info.get("base_model"):
        path = resolve_model_path(info["base_model"])
    if not path or (not Path(path).exists() and looks_local(path)):
        raise UserError(f"base model `{info.get('base_model')}` not found at {info.get('base_model_path')}; the run "
                        "works only with the exact base it was trained on: put it back there")
    return path


def load_for_eval(model_path: str, adapter: Path | None, tokenizer_path: str):
    import torch

    from finetune.models.load import load_adapter, load_model, load_tokenizer
    from finetune.models.weights import check_adapter_dir

    if adapter is not None:
        check_adapter_dir(adapter)  # before the base loads: a damaged adapter is named at once, not minutes later
    tokenizer, _ = load_tokenizer(tokenizer_path)
    model = load_model(model_path, torch.float32, "sdpa", vocab_size=len(tokenizer))
    if adapter is not None:
        model = load_adapter(model, adapter)
    model.config.use_cache = True
    return model.eval(), tokenizer


def eval_template(tokenizer, fold_system: bool = False) -> ChatTemplate:
    try:
        return chat_template(tokenizer, fold_system=fold_system)
    except ValueError as err:
        raise UserError(f"model: {err}") from None


def checked_candidates(where: Target, with_base: bool) -> dict[str, tuple[str, Path | None]]:
    """name -> (model path, adapter) of each model to evaluate (the base first, when asked), every weight file
    checked before minutes of evaluation begin."""
    from finetune.models.weights import check_adapter_dir, check_model_dir

    candidates = {"tuned" if where.base_path else "model": (where.model_path, where.adapter)}
    if with_base:
        candidates = {"base": (where.base_path, None), **candidates}
    for model_path, adapter in candidates.values():
        check_model_dir(model_path)
        if adapter is not None:
            check_adapter_dir(adapter)
    return candidates


def score_candidates(where: Target, with_base: bool, score, load=None) -> dict:
    """name -> score(name, model, tokenizer, progress) for each model to evaluate (checked_candidates), loaded in
    turn inside one transient progress display; each model is released before the next one loads. `load`: the
    loader, load_for_eval's arguments and results (a vision-language model's gives its processor)."""
    from rich.progress import Progress

    candidates = checked_candidates(where, with_base)
    scores = {}
    with Progress(transient=True) as progress:
        for name, (model_path, adapter) in candidates.items():
            model, tokenizer = (load or load_for_eval)(model_path, adapter, where.tokenizer_source)
            scores[name] = score(name, model, tokenizer, progress)
            del model
    return scores


def right_padded(sequences: list[list[int]], pad_id: int):
    """A batch of token lists padded on the right to the longest: (input_ids, attention_mask) tensors."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return ids, mask


def markdown_table(results: dict[str, dict], keys: list[str]) -> str:
    """One row per model, one column per metric (absent metrics as -)."""
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, metrics in results.items():
        cells = [f"{metrics[k]:.4f}" if isinstance(metrics.get(k), float) else str(metrics.get(k, "-")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(target: str, where: Target, report: dict, keys: list[str], log=print) -> dict:
    """eval.json (everything), eval.md (the table of report["results"] over keys) and, for a run evaluated into its
    own dir, its model card."""
    from finetune.eval.bench.report import benchmarks_part

    table = markdown_table(report["results"], keys)
    where.out_dir.mkdir(parents=True, exist_ok=True)
    data_path, md_path = where.out_dir / "eval.json", where.out_dir / "eval.md"
    # Benchmark results of the same weights (finetune eval --benchmarks) stay beside the task's.
    earlier = json.loads(data_path.read_text()).get("benchmarks") if data_path.is_file() else None
    benchmarks = benchmarks_part(md_path.read_text()) if md_path.is_file() else ""
    write_atomic(data_path, json.dumps({**report, **({"benchmarks": earlier} if earlier else {})}, indent=2) + "\n")
    write_atomic(md_path, table + "\n" + (f"\n{benchmarks}\n" if benchmarks else ""))
    refresh_card(target, where.out_dir)
    log(table)
    log(f"wrote {where.out_dir / 'eval.json'} and {where.out_dir / 'eval.md'}")
    return report
