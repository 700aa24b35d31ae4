"""`finetune data` for a vision-language model: the recipe's rows with their images read and encoded exactly as the
processor sees them, what was refused, and samples showing where image tokens sit (never trained)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape
from rich.text import Text

from finetune.data.display import highlight, refusal_lines
from finetune.data.rows import check_bad_fraction
from finetune.data.sources import row_name
from finetune.data.vision_data import encode_rows


def inspect_vision(recipe, processor, show: int, dump: Path | None, console, say) -> dict:
    d = recipe.data
    samples, problems, total = [], [], 0
    for source in d.train_sources():
        encoded, read = encode_rows(processor, source, d, problems)
        samples, total = samples + [(e.conversation, e.sample) for e in encoded], total + read
    images = sum(len(conversation.images or []) for conversation, _ in samples)
    check_bad_fraction(problems, total, d.max_bad_fraction, console.print)
    image_ids = _image_ids(processor)
    lengths = [len(s.input_ids) for _, s in samples]
    image_tokens = sum(token in image_ids for _, s in samples for token in s.input_ids)
    trained = sum(label != -100 for _, s in samples for label in s.labels)
    report = {"rows_read": total, "rows_kept": len(samples), "rows_refused": len(problems), "images": images,
              "image_tokens": image_tokens, "tokens_mean": sum(lengths) / max(len(lengths), 1),
              "truncated": sum(s.truncated for _, s in samples), "max_length": d.max_length,
              "trained_share": trained / max(sum(lengths), 1), "processor": type(processor).__name__}
    say(f"vision-language model: {report['processor']}'s chat template; images expanded by the processor, "
        "their tokens never trained")
    say(f"rows: {total} read, {len(samples)} kept, {len(problems)} refused; {images} images, {image_tokens} image "
        f"tokens")
    say(f"tokens per sample: mean {report['tokens_mean']:.1f}; {report['truncated']} cut at max_length={d.max_length}")
    say(f"tokens trained: {report['trained_share']:.1%} (assistant answers and their end-of-turn token)")
    for line in refusal_lines(problems):
        say(line)
    marks = ("", "") if console.color_system else ("⟦", "⟧")
    for number, (conversation, sample) in enumerate(samples[:show]):
        say(f"\n[bold]sample {number + 1}[/bold] ({escape(row_name(conversation.source, conversation.row))}, "
            f"{len(sample.input_ids)} tokens):")
        console.print(_highlight(processor.tokenizer, sample, image_ids, marks), soft_wrap=True)
    if dump is not None:
        with dump.open("w", encoding="utf-8") as handle:
            for conversation, sample in samples:
                handle.write(json.dumps({"source": conversation.source, "row": conversation.row,
                                         "input_ids": sample.input_ids, "labels": sample.labels}) + "\n")
        say(f"wrote {len(samples)} training samples to {escape(str(dump))}")
    return report


def inspect_vision_pairs(recipe, processor, show: int, console, say) -> dict:
    """`finetune data` for image preference rows (objective dpo): rows read, kept and refused, and each shown pair's
    two sequences, the answer trained, image tokens marked."""
    from types import SimpleNamespace

    from finetune.data.vision_pairs import encode_pairs, read_vision_pairs

    d, [source] = recipe.data, recipe.data.train_sources()
    pairs, problems, total, _ = read_vision_pairs(source.path, source.split, source.columns)
    encoded = encode_pairs(processor, pairs, d, problems)
    check_bad_fraction(problems, max(total, 1), d.max_bad_fraction, console.print)
    images = sum(len(pair.images) for pair, _ in encoded)
    say(f"vision-language model: {type(processor).__name__}'s chat template; preference rows with images in "
        "their prompts, each answer after the same prompt")
    say(f"pairs: {total} read, {len(encoded)} kept, {len(problems)} refused; {images} images")
    for line in refusal_lines(problems):
        say(line)
    marks = ("", "") if console.color_system else ("⟦", "⟧")
    image_ids = _image_ids(processor)
    for number, (pair, row) in enumerate(encoded[:show]):
        for name in ("chosen", "rejected"):
            sample = SimpleNamespace(input_ids=row[f"{name}_input_ids"], labels=row[f"{name}_labels"])
            say(f"\n[bold]pair {number + 1} {name}[/bold] ({escape(row_name(pair.source, pair.row))}, "
                f"{len(sample.input_ids)} tokens):")
            console.print(_highlight(processor.tokenizer, sample, image_ids, marks), soft_wrap=True)
    return {"rows_read": total, "rows_kept": len(encoded), "rows_refused": len(problems), "images": images}


def _image_ids(processor) -> set[int]:
    """The processor's image placeholder, and the tokens it expands to where they differ (Gemma-3's soft tokens)."""
    return {processor.tokenizer.convert_tokens_to_ids(token) for token in
            (processor.image_token, getattr(processor.tokenizer, "image_token", None)) if token}


def _highlight(tokenizer, sample, image_ids: set[int], marks) -> Text:
    """The sample as text, trained stretches bold green (between `marks`), each image's tokens as one dim
    `⟨image: N tokens⟩`."""
    text, start, ids = Text(), 0, sample.input_ids
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (ids[end] in image_ids) != (ids[start] in image_ids):
            if ids[start] in image_ids:
                text.append(f"⟨image: {end - start} tokens⟩", style="dim")
            else:
                text.append_text(highlight(tokenizer, ids[start:end], sample.labels[start:end], marks))
            start = end
    return text
