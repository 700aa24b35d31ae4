"""`finetune eval` and `finetune chat --image` for vision-language models: held-out image questions scored by loss
on the answer tokens training put in the loss and by exact match of greedy answers, the base beside the tuned model;
a chat whose user turns may show an image."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

from finetune.data.rows import Conversation
from finetune.data.sources import row_name
from finetune.errors import UserError
from finetune.eval.sft import KEYS, SAMPLES_SHOWN, last_prompt_turn, match_scores, prompt_messages, reference
from finetune.eval.targets import Target, score_candidates, write_report


def held_out_image_rows(target: str, recipe: Path | None, data: Path | None) -> list[Conversation]:
    """The rows to score: `--data` (read with its images), else the run's held_out.jsonl."""
    from finetune.data.preference.prepare import is_saved_pairs
    from finetune.data.rows import check_bad_fraction, read_saved_conversations, read_source

    if data is not None:
        read = read_source(str(data), "test", "auto", media=True)
        check_bad_fraction(read.problems, max(read.total, 1), 0.0, print)
        return read.rows
    if recipe is not None:
        raise UserError("--recipe with a vision-language model: pass the held-out image rows with --data FILE")
    saved = Path(target) / "held_out.jsonl"
    if is_saved_pairs(saved):
        raise UserError(f"{saved}: a preference run's held-out pairs; scoring them on a vision-language model is not "
                        "supported yet: pass image questions with answers as --data FILE")
    rows = read_saved_conversations(saved)
    if not rows:
        raise UserError(f"{saved}: the run held out no rows; pass --data FILE")
    return rows


def load_vision_for_eval(model_path: str, adapter: Path | None, processor_path: str):
    """(model, processor): the model in fp32 with its adapter applied, and the processor the run saved."""
    import torch

    from finetune.models.load import load_adapter
    from finetune.models.vision import load_processor, load_vision_model
    from finetune.run.console import quiet_weight_bars

    quiet_weight_bars()
    processor = load_processor(processor_path)
    model = load_vision_model(model_path, torch.float32, "sdpa")
    if adapter is not None:
        model = load_adapter(model, adapter)
    model.config.use_cache = True
    return model.eval(), processor


def answer_loss(model, processor, rows: list[Conversation], max_length: int = 4096) -> dict:
    """Token-weighted cross-entropy over the answer tokens (as training labels them), one row per forward."""
    import torch
    import torch.nn.functional as F

    from finetune.data.vision import encode_vision, open_image
    from finetune.data.vision_data import VisionCollator

    total, count, collate = 0.0, 0, VisionCollator(processor)
    for row in rows:
        try:
            sample = encode_vision(processor, row.messages, [open_image(r) for r in row.images or []], max_length)
        except (ValueError, OSError) as err:
            raise UserError(f"{row_name(row.source, row.row)}: {err}") from None
        refs = [json.dumps(ref.record()) for ref in row.images or []]
        batch = collate.batch([(sample.text, sample.input_ids, sample.labels, refs)])
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits.float()
        total += F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum").item()
        count += int((labels[0, 1:] != -100).sum())
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(mean), "assistant_tokens": count}


def generate_answer(model, processor, messages: list[dict], images: list, max_new_tokens: int, streamer=None) -> str:
    """The greedy answer to `messages` (text with `<image>` placeholders, `images` in their order)."""
    import torch

    from finetune.data.template import stop_token_ids
    from finetune.data.vision import content_parts

    text = processor.apply_chat_template(content_parts(messages), tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[images] if images else None, return_tensors="pt",
                      add_special_tokens=False)
    tokenizer = processor.tokenizer
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_token_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id,
                             streamer=streamer)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def evaluate_vision_model(model, processor, rows: list[Conversation], max_new_tokens: int, progress=None):
    from finetune.data.vision import open_image

    metrics = answer_loss(model, processor, rows)
    predictions = []
    for row in rows:
        images = [open_image(ref) for ref in row.images or []]
        predictions.append(generate_answer(model, processor, prompt_messages(row.messages), images, max_new_tokens))
        if progress:
            progress(1)
    metrics.update(match_scores(predictions, [reference(r.messages) for r in rows]))
    return metrics, predictions


def run_vision_eval(target: str, where: Target, rows: list[Conversation], compare_base: bool, max_new_tokens: int,
                    log=print) -> dict:
    """Loss and exact match of the model (and, with compare_base, its base) on the same image rows; writes
    eval.json and eval.md as the text evaluation does."""
    from rich.markup import escape

    if compare_base and where.base_path is None:
        raise UserError("--compare-base needs a run directory (its run.json names the base model)")

    def score(name, model, processor, progress):
        task = progress.add_task(f"eval {name}", total=len(rows))
        return evaluate_vision_model(model, processor, rows, max_new_tokens, partial(progress.advance, task))

    scored = score_candidates(where, compare_base, score, load=load_vision_for_eval)
    results = {name: metrics for name, (metrics, _) in scored.items()}
    samples = [{"prompt": last_prompt_turn(r.messages), "images": [ref.describe() for ref in r.images or []],
                "reference": reference(r.messages), **{name: answers[i] for name, (_, answers) in scored.items()}}
               for i, r in enumerate(rows)]
    for sample in samples[:SAMPLES_SHOWN]:
        log(f"[dim]prompt:[/dim] {escape(sample['prompt'])} [dim]({len(sample['images'])} image(s))[/dim]\n"
            f"[dim]reference:[/dim] {escape(sample['reference'])}")
        for name in scored:
            log(f"[dim]{name}:[/dim] {escape(sample[name])}")
    report = {"target": target, "rows": len(rows), "results": results, "samples": samples}
    return write_report(target, where, report, KEYS, log)
