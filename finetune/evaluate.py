"""`finetune eval`: held-out loss/perplexity on assistant tokens and greedy-generation match scores.

The rows are exactly the ones a run saved (held_out.jsonl); for a bare model they come from `--data` or from
a recipe's held-out source (rebuilt with the same seeded split).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.data import Conversation, encode_samples, load_conversations, read_saved_conversations, split_held_out
from finetune.data.template import ChatTemplate, chat_template, fit_messages, stop_token_ids
from finetune import rundir
from finetune.errors import UserError

SAMPLES_SHOWN = 3


@dataclass
class Target:
    """What to evaluate: a model dir (plus an optional adapter) and where results go."""

    model_path: str
    adapter: Path | None
    base_path: str | None  # for --compare-base
    out_dir: Path
    fold_system: bool = False  # the run's data.fold_system: prompts are folded as training folded them


def run_fold_system(run_dir: Path) -> bool:
    """Whether a run folded system text into the first user turn (data.fold_system in its recipe.yaml)."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return bool((saved.get("data") or {}).get("fold_system", False))


def resolve_target(target: str, output: Path | None) -> Target:
    from finetune.modeling import resolve_model_path

    path = Path(target)
    info = rundir.finished_run(path)
    if info is not None:
        fold = run_fold_system(path)
        if info["artifact"] == "adapter":
            base = run_base_model(info)
            return Target(base, path / "adapter", base, output or path, fold)
        return Target(str(path / "model"), None, info.get("base_model_path"), output or path, fold)
    model_path = resolve_model_path(target)
    if not Path(model_path).exists():
        raise UserError(f"{target}: neither a run directory (with run.json), a model directory, nor an alias")
    return Target(model_path, None, None, output or Path("runs") / "eval" / Path(target).name)


def refresh_card(target: str, out_dir: Path) -> None:
    """A finished run evaluated into its own dir: its weights' model card gets the evaluation table."""
    from finetune.card import write_model_card

    info = rundir.finished_run(Path(target))
    if info is not None and Path(out_dir).resolve() == Path(target).resolve():
        write_model_card(Path(target), Path(target) / info["artifact"])


def run_base_model(info: dict) -> str:
    """The base a run was trained on: its recorded local path, else its name resolved again (an alias fetched
    again, a hub id). A local path that is gone is refused: an adapter only fits its exact base."""
    from finetune.modeling import resolve_model_path
    from finetune.weights import looks_local

    path = info.get("base_model_path") or ""
    if not Path(path).exists() and info.get("base_model"):
        path = resolve_model_path(info["base_model"])
    if not path or (not Path(path).exists() and looks_local(path)):
        raise UserError(f"base model `{info.get('base_model')}` not found at {info.get('base_model_path')}; the run "
                        "works only with the exact base it was trained on: put it back there")
    return path


def held_out_rows(target: str, recipe_path: Path | None, data: Path | None) -> list[Conversation]:
    if data is not None:
        rows, problems, _ = load_conversations(str(data), "test", "auto")
        if problems:
            raise UserError(f"{data}: {len(problems)} malformed rows, e.g. {problems[0]}")
        return rows
    if recipe_path is not None:
        from finetune.recipe import load_recipe

        recipe = load_recipe(recipe_path)
        d = recipe.data
        if d.eval is not None:
            return load_conversations(d.eval, d.eval_split, d.format)[0]
        if d.eval_fraction > 0:  # each source's share, drawn as training drew it
            return [row for s in d.train_sources() for row in split_held_out(
                load_conversations(s.path, s.split, s.format, columns=s.columns)[0], d.eval_fraction,
                recipe.train.seed)[1]]
        raise UserError(f"{recipe_path}: the recipe has no held-out data (data.eval or data.eval_fraction)")
    saved = Path(target) / "held_out.jsonl"
    if saved.exists():
        rows = read_saved_conversations(saved)
        if rows:
            return rows
        raise UserError(f"{saved}: the run held out no rows; pass --data FILE")
    raise UserError(f"{target}: not a run directory; pass --data FILE or --recipe RECIPE to say which rows to use")


def load_for_eval(model_path: str, adapter: Path | None, tokenizer_path: str):
    import torch

    from finetune.modeling import load_adapter, load_model, load_tokenizer
    from finetune.weights import check_adapter_dir

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


def assistant_loss(model, tokenizer, rows: list[Conversation], batch_size: int, max_length: int = 2048,
                   template: ChatTemplate | None = None) -> dict:
    """Token-weighted mean cross-entropy over assistant tokens (the same tokens training puts in the loss)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    encoded = []
    template = template or eval_template(tokenizer)
    for row in rows:
        try:
            samples = encode_samples(tokenizer, row.messages, max_length, row.tools, template)
            encoded += [(s.input_ids, s.labels) for s in samples]
        except ValueError as err:
            raise UserError(f"{row.source}:{row.row}: {err}") from None
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((labels[:, 1:] != -100).sum())
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(mean), "assistant_tokens": count}


def generate(model, tokenizer, rows: list[Conversation], batch_size: int, max_new_tokens: int, progress=None,
             template: ChatTemplate | None = None):
    """Greedy answers to each row's last assistant turn, given everything before it (folded as training folded
    it when the run used data.fold_system)."""
    import torch

    template = template or eval_template(tokenizer)

    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    stop = stop_token_ids(tokenizer, model)  # the template's end of turn, eos, and the model's configured ones
    outputs = []
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start:start + batch_size]
        prompts = [_fitted_prompt(template, r) for r in batch_rows]
        texts = [prompt_text(tokenizer, p, r.tools) for p, r in zip(prompts, batch_rows)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        outputs += [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in new]
        if progress:
            progress(len(prompts))
    return outputs


def prompt_text(tokenizer, prompt: list[dict], tools: list | None = None) -> str:
    """The prompt rendered up to the start of the assistant's answer. A row that opens with the answer (training
    accepts it) gets the bare generation prompt: transformers refuses to render an empty conversation."""
    if prompt:
        return tokenizer.apply_chat_template(prompt, tools=tools, tokenize=False, add_generation_prompt=True)
    probe = [{"role": "user", "content": "x"}]
    with_prompt = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    return with_prompt[len(tokenizer.apply_chat_template(probe, tokenize=False)):]


def _answer(messages: list[dict]) -> int:
    """The turn scored by generation: the last assistant turn training put in the loss (`weight` 0 is context)."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = [i for i in assistant if messages[i].get("weight", 1) != 0]
    return (trained or assistant)[-1]


def _prompt(messages: list[dict]) -> list[dict]:
    return messages[:_answer(messages)]


def _fitted_prompt(template: ChatTemplate, row: Conversation) -> list[dict]:
    try:
        return fit_messages(template, _prompt(row.messages))
    except ValueError as err:
        raise UserError(f"{row.source}:{row.row}: {err}") from None


def _last_prompt_turn(messages: list[dict]) -> str:
    prompt = _prompt(messages)
    return prompt[-1]["content"] if prompt else ""  # a row that opens with the answer has no prompt


def reference(messages: list[dict]) -> str:
    return messages[_answer(messages)]["content"].strip()


def normalise(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation or quotes: forgives form, not content."""
    text = re.sub(r"\s+", " ", text.lower()).strip()
    return text.strip(" .,;:!?\"'`")


def match_scores(predictions: list[str], references: list[str]) -> dict:
    n = max(len(references), 1)
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    loose = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references))
    return {"exact_match": exact / n, "normalised_match": loose / n, "rows": len(references)}


def evaluate_model(model, tokenizer, rows: list[Conversation], batch_size: int, max_new_tokens: int,
                   progress=None, fold_system: bool = False) -> tuple[dict, list[str]]:
    template = eval_template(tokenizer, fold_system)
    metrics = assistant_loss(model, tokenizer, rows, batch_size, template=template)
    predictions = generate(model, tokenizer, rows, batch_size, max_new_tokens, progress, template)
    metrics.update(match_scores(predictions, [reference(r.messages) for r in rows]))
    return metrics, predictions


def markdown_table(results: dict[str, dict]) -> str:
    keys = ("loss", "perplexity", "exact_match", "normalised_match", "rows")
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, metrics in results.items():
        cells = [f"{metrics[k]:.4f}" if isinstance(metrics[k], float) else str(metrics[k]) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_eval(target: str, recipe: Path | None = None, data: Path | None = None, compare_base: bool = False,
             max_samples: int | None = None, max_new_tokens: int = 64, batch_size: int = 8,
             output: Path | None = None, log=print) -> dict:
    """Evaluate a run or model (and optionally its base) on the same rows; write eval.json and eval.md."""
    from rich.markup import escape
    from rich.progress import Progress

    from finetune.weights import check_adapter_dir, check_model_dir

    where = resolve_target(target, output)
    if recipe is not None:
        from finetune.recipe import load_recipe

        where.fold_system = load_recipe(recipe).data.fold_system
    from finetune.preference_eval import held_out_pairs, run_preference_eval

    pairs = held_out_pairs(target, recipe, data)
    if pairs is not None:
        return run_preference_eval(target, where, pairs[:max_samples], batch_size, recipe, log)
    rows = held_out_rows(target, recipe, data)[:max_samples]
    tokenizer_source = str(where.adapter) if where.adapter is not None else where.model_path
    candidates = {"tuned" if where.base_path else "model": (where.model_path, where.adapter)}
    if compare_base:
        if where.base_path is None:
            raise UserError("--compare-base needs a run directory (its run.json names the base model)")
        candidates = {"base": (where.base_path, None), **candidates}
    results, predictions = {}, {}
    for model_path, adapter in candidates.values():  # every weight file, before minutes of evaluation
        check_model_dir(model_path)
        if adapter is not None:
            check_adapter_dir(adapter)
    with Progress(transient=True) as progress:
        for name, (model_path, adapter) in candidates.items():
            model, tokenizer = load_for_eval(model_path, adapter, tokenizer_source)
            task = progress.add_task(f"eval {name}", total=len(rows))
            results[name], predictions[name] = evaluate_model(
                model, tokenizer, rows, batch_size, max_new_tokens, lambda n: progress.advance(task, n),
                where.fold_system)
            del model
    where.out_dir.mkdir(parents=True, exist_ok=True)
    samples = [{"prompt": _last_prompt_turn(r.messages), "reference": reference(r.messages),
                **{name: predictions[name][i] for name in predictions}} for i, r in enumerate(rows)]
    report = {"target": target, "rows": len(rows), "results": results, "samples": samples}
    (where.out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(results)
    (where.out_dir / "eval.md").write_text(table + "\n")
    refresh_card(target, where.out_dir)
    for sample in samples[:SAMPLES_SHOWN]:
        log(f"[dim]prompt:[/dim] {escape(sample['prompt'])}\n[dim]reference:[/dim] {escape(sample['reference'])}")
        for name in predictions:
            log(f"[dim]{name}:[/dim] {escape(sample[name])}")
    log(table)
    log(f"wrote {where.out_dir / 'eval.json'} and {where.out_dir / 'eval.md'}")
    return report

