"""`finetune eval`: held-out loss/perplexity on assistant tokens and greedy-generation match scores.

The rows are exactly the ones a run saved (held_out.jsonl); for a bare model they come from `--data` or from
a recipe's held-out source (rebuilt with the same seeded split).
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path

from finetune.data.rows import (
    Conversation,
    load_conversations,
    read_saved_conversations,
    split_held_out,
)
from finetune.data.sources import row_name
from finetune.data.template import (
    ChatTemplate,
    encode_samples,
    fit_messages,
    stop_token_ids,
)
from finetune.errors import UserError
from finetune.eval.targets import Target, eval_template, right_padded, score_candidates, write_report
from finetune.eval.text import TEXT_KEYS, document_loss, text_settings

SAMPLES_SHOWN = 3
KEYS = ["loss", "perplexity", "exact_match", "normalised_match", "rows"]


def held_out_rows(target: str, recipe_path: Path | None, data: Path | None) -> list[Conversation]:
    if data is not None:
        rows, problems, _ = load_conversations(str(data), "test", "auto")
        if problems:
            raise UserError(f"{data}: {len(problems)} malformed rows, e.g. {problems[0]}")
        return rows
    if recipe_path is not None:
        from finetune.recipe.load import load_recipe

        recipe = load_recipe(recipe_path)
        d = recipe.data
        if d.eval is not None:
            return load_conversations(d.eval, d.eval_split, d.format, text=d.text_options())[0]
        if d.eval_fraction > 0:  # each source's share, drawn as training drew it
            return [row for s in d.train_sources() for row in split_held_out(
                load_conversations(s.path, s.split, s.format, columns=s.columns, text=d.text_options())[0],
                d.eval_fraction, recipe.train.seed)[1]]
        raise UserError(f"{recipe_path}: the recipe has no held-out data (data.eval or data.eval_fraction)")
    saved = Path(target) / "held_out.jsonl"
    if saved.exists():
        rows = read_saved_conversations(saved)
        if rows:
            return rows
        raise UserError(f"{saved}: the run held out no rows; pass --data FILE")
    raise UserError(no_held_out(target))


def no_held_out(target: str) -> str:
    """Why there are no saved held-out rows, and what to pass instead. A run is known by its run.json, so a run
    whose held_out.jsonl was removed is still called a run."""
    from finetune.models.inputs import RUN_DIR, identify

    item = identify(target)
    if item.kind == RUN_DIR:
        return (f"{item.path / 'held_out.jsonl'}: missing, so the rows this run held out are gone (training writes "
                f"them there). Pass --data FILE to evaluate on a data file, or --recipe {item.path / 'recipe.yaml'} "
                "to draw the held-out rows again as training drew them (data.eval or data.eval_fraction)")
    return (f"{target}: {item.describe()}, so it has no held-out rows of a run; pass --data FILE or --recipe RECIPE "
            "to say which rows to use")


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
            raise UserError(f"{row_name(row.source, row.row)}: {err}") from None
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        ids, mask = right_padded([i for i, _ in batch], tokenizer.pad_token_id)
        labels, _ = right_padded([lab for _, lab in batch], -100)
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


def prompt_messages(messages: list[dict]) -> list[dict]:
    return messages[:_answer(messages)]


def _fitted_prompt(template: ChatTemplate, row: Conversation) -> list[dict]:
    try:
        return fit_messages(template, prompt_messages(row.messages))
    except ValueError as err:
        raise UserError(f"{row_name(row.source, row.row)}: {err}") from None


def last_prompt_turn(messages: list[dict]) -> str:
    prompt = prompt_messages(messages)
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


def run_sft_eval(target: str, where: Target, rows: list[Conversation], compare_base: bool, max_new_tokens: int,
                 batch_size: int, log=print, recipe: Path | None = None) -> dict:
    """Loss and greedy-generation scores of the model (and, with compare_base, its base) on the same rows; writes
    eval.json and eval.md. Text documents (format text) get their perplexity only, as the run cut them into blocks
    (`recipe`'s settings, else the run's); in a mixed set, as text_loss and text_perplexity beside the chat scores."""
    from rich.markup import escape

    if compare_base and where.base_path is None:
        raise UserError("--compare-base needs a run directory (its run.json names the base model)")
    documents, chats = [r for r in rows if r.text is not None], [r for r in rows if r.text is None]
    settings = text_settings(target, recipe) if documents else None

    def score(name, model, tokenizer, progress):
        task = progress.add_task(f"eval {name}", total=len(rows))
        metrics, answers = evaluate_model(model, tokenizer, chats, batch_size, max_new_tokens,
                                          partial(progress.advance, task), where.fold_system) if chats else ({}, [])
        if documents:
            text = document_loss(model, tokenizer, documents, batch_size, *settings)
            metrics.update(text if not chats else {f"text_{key}": value for key, value in text.items()})
            progress.advance(task, len(documents))
        return metrics, answers

    scored = score_candidates(where, compare_base, score)
    results = {name: metrics for name, (metrics, _) in scored.items()}
    predictions = {name: answers for name, (_, answers) in scored.items()}
    samples = [{"prompt": last_prompt_turn(r.messages), "reference": reference(r.messages),
                **{name: predictions[name][i] for name in predictions}} for i, r in enumerate(chats)]
    for sample in samples[:SAMPLES_SHOWN]:
        log(f"[dim]prompt:[/dim] {escape(sample['prompt'])}\n[dim]reference:[/dim] {escape(sample['reference'])}")
        for name in predictions:
            log(f"[dim]{name}:[/dim] {escape(sample[name])}")
    keys = KEYS + ["text_loss", "text_perplexity", "text_documents"] if documents and chats else \
        TEXT_KEYS if documents else KEYS
    report = {"target": target, "rows": len(rows), "results": results, "samples": samples}
    return write_report(target, where, report, keys, log)
