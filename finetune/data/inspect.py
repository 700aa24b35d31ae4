"""`finetune data`: prepare a recipe's data exactly as `train` does, load no model weights, and say what will train.

The tokenizer, chat template and `build_datasets` call are the ones `finetune.run.flow` makes, so the report, the
highlighted rows and the `--dump` file describe the very samples the trainer receives (a test asserts it).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape

from finetune.data.display import highlight, refusal_lines
from finetune.data.sources import folder_listing, row_name, row_origin

_REASONS_SHOWN = 8


def inspect_data(recipe, show: int = 0, dump: Path | None = None, console=None) -> dict:
    from rich.console import Console

    from finetune.data.prepare import build_datasets
    from finetune.models.load import load_tokenizer, resolve_model_path, template_for

    recipe.data.require_rows("finetune data")
    console = console or Console()
    log = console.print

    def say(line: str) -> None:  # report lines keep their length (paths, reasons): tests and greps read them whole
        console.print(line, soft_wrap=True, highlight=False)
    d, m = recipe.data, recipe.model
    model_path = resolve_model_path(m.name_or_path, log)
    from finetune.models.vision import is_vision_language, load_processor

    if is_vision_language(model_path):  # rows with images, through the model's processor
        from finetune.data.vision_report import inspect_vision

        processor = load_processor(model_path, m.trust_remote_code)
        if recipe.objective.data_kind == "preference":
            from finetune.data.vision_report import inspect_vision_pairs

            return inspect_vision_pairs(recipe, processor, show, console, say)
        return inspect_vision(recipe, processor, show, dump, console, say)
    tokenizer, added = load_tokenizer(model_path, m.trust_remote_code, d.chat_template)
    template = template_for(tokenizer, d.chat_template, d.fold_system, m.name_or_path)
    if recipe.objective.data_kind != "conversations":  # preference pairs or labelled answers: their own report
        return _inspect_preference(recipe, tokenizer, template, show, dump, log, say)
    data = build_datasets(
        tokenizer, train=d.train_sources(), train_split=d.train_split, eval=d.eval, eval_split=d.eval_split,
        eval_fraction=d.eval_fraction, format=d.format, max_length=d.max_length,
        max_bad_fraction=d.max_bad_fraction, seed=recipe.train.seed, log=log, template=template, cache=d.cache,
        num_proc=d.num_proc, streaming=d.streaming, text=d.text_options(),
    )
    if data.streaming:
        say(f"data.streaming: this report covers the first {_materialise(data)} training samples of the stream")
    report = summarise(data, d.max_length)
    report.update(template=template.name, end_of_turn=template.end_of_turn,
                  added_tokens=tokenizer.convert_ids_to_tokens(added), text=data.text,
                  trained_what=_trained_what(data))
    _print_report(report, data.problems, say)
    for line in data.text_lines(d.max_length, d.overlap):
        say(escape(line))
    if len(data.mix) > 1:
        say("training mix:")
        for line in data.mix_lines():
            say(f"  {escape(line)}")
    for source, split in [(s.path, s.split) for s in d.train_sources()] + ([(d.eval, d.eval_split)] if d.eval else []):
        files = folder_listing(source, split)  # a folder or glob: the files read, and those passed over
        for line in files.lines() if files else []:
            say(escape(line))
    if data.cache_line:
        say(escape(data.cache_line))
    for number in range(min(show, len(data.train))):
        source, row = data.origin(number)
        sample = data.train[number]
        legend = "[bold green]trained[/bold green], [dim]not trained[/dim]" if console.color_system else "⟦trained⟧"
        where = f"{source}, streamed" if data.streaming else row_name(source, row)
        say(f"\n[bold]sample {number + 1}[/bold] ({escape(where)}, {len(sample['input_ids'])} tokens; "
            f"{legend}):")
        marks = ("", "") if console.color_system else ("⟦", "⟧")  # piped or NO_COLOR: trained text in brackets
        console.print(highlight(tokenizer, sample["input_ids"], sample["labels"], marks), soft_wrap=True)
    if dump is not None:
        write_dump(dump, data)
        say(f"wrote {len(data.train)} training samples to {escape(str(dump))}")
    return report


def _inspect_preference(recipe, tokenizer, template, show: int, dump: Path | None, log, say) -> dict:
    """The report of a preference objective's data, prepared by the objective exactly as `train` prepares it."""
    data = recipe.objective.build_data(recipe, tokenizer, template, log)
    what = {"unpaired": "labelled answers", "prompts": "prompts"}.get(recipe.objective.data_kind, "pairs")
    held = len(data.held_out)
    report = {"rows_read": data.rows_read, "rows_refused": len(data.problems), "train_samples": len(data.train),
              "eval_samples": held, "tokens_mean": data.mean_train_tokens, "truncated": data.truncated,
              "max_length": recipe.data.max_length, "template": template.name, "objective": recipe.objective.name}
    say(f"chat template: {escape(template.name)}, end of turn {escape(template.end_of_turn)}")
    say(f"objective {recipe.objective.name}: {data.rows_read} rows read, {len(data.problems)} refused; "
        f"{len(data.train)} training {what}, {held} held out")
    if what == "prompts":  # the completions come at training time, up to the objective's limit
        limit = recipe.objective.max_completion_length
        say(f"prompt tokens (rendered): mean {data.mean_train_tokens - limit:.1f}; completions add up to {limit}")
    else:
        say(f"tokens per training row (as the model sees it): mean {data.mean_train_tokens:.1f}; {data.truncated} cut "
            f"at max_length={recipe.data.max_length}")
    for problem in data.problems[:_REASONS_SHOWN]:
        say(f"  refused: {escape(problem)}")
    if data.cache_line:
        say(escape(data.cache_line))
    for number in range(min(show, len(data.train))):
        row = data.train[number]
        say(f"\n[bold]row {number + 1}[/bold]:")
        for column, value in row.items():
            if column.endswith("_ids"):
                say(f"  [bold]{column.removesuffix('_ids')}[/bold]: {escape(tokenizer.decode(value))}")
            elif what == "prompts":  # the rendered prompt the policy answers, and what its rewards receive
                say(f"  [bold]{column}[/bold]: {escape(str(value))}")
    if dump is not None:
        with dump.open("w", encoding="utf-8") as handle:
            for row in data.train:
                handle.write(json.dumps(row) + "\n")
        say(f"wrote {len(data.train)} training {what} to {escape(str(dump))}")
    return report


#: Samples of a stream that `finetune data` reads to report on.
STREAM_REPORT = 1000


def _materialise(data) -> int:
    """Replace a stream by its first STREAM_REPORT samples (the same order training reads them in)."""
    from itertools import islice

    import datasets

    first = list(islice(iter(data.train), STREAM_REPORT))
    data.train = datasets.Dataset.from_list(first)
    # A stream does not keep which row a sample came from (row 0 stands for "streamed").
    data.train_rows = datasets.Dataset.from_dict({"source": [0] * len(first), "row": [0] * len(first)})
    data.rows_read = len(first)
    return len(first)


def summarise(data, max_length: int) -> dict:
    import numpy as np
    import pyarrow.compute as pc

    # On the Arrow columns: a million-row set never becomes Python lists.
    lengths = np.sort(pc.list_value_length(data.train.data.column("input_ids")).to_numpy())
    trained = pc.sum(pc.not_equal(pc.list_flatten(data.train.data.column("labels")), -100)).as_py()
    # A row is its source and its number: row 5 of two sources is two rows.
    train_rows = data.rows_read if data.streaming else \
        len(set(zip(data.train_rows["source"], data.train_rows["row"])))
    rows_kept = train_rows + len(data.eval_conversations)
    return {
        "rows_read": data.rows_read, "rows_kept": rows_kept, "rows_refused": len(data.problems),
        "train_samples": len(lengths), "eval_samples": len(data.eval) if data.eval is not None else 0,
        "tokens_mean": float(lengths.mean()), "tokens_p95": int(lengths[min(len(lengths) - 1,
                                                                                int(0.95 * len(lengths)))]),
        "tokens_max": int(lengths[-1]), "truncated": data.truncated, "max_length": max_length,
        "trained_share": trained / int(lengths.sum()), "mix": data.mix,
    }


def _trained_what(data) -> str:
    """What carries loss, for the report's `tokens trained` line."""
    if data.all_text:
        return "every token of the text documents, overlap context excepted"
    if data.text:
        return "every token of the text documents; assistant answers and their end-of-turn token in the chat rows"
    return "assistant answers and their end-of-turn token"


def _print_report(report: dict, problems: list[str], log) -> None:
    log(f"chat template: {escape(report['template'])}, end of turn {escape(report['end_of_turn'])}"
        + (f" (added to the tokenizer: {escape(', '.join(report['added_tokens']))})" if report["added_tokens"] else "")
        + ("; raw text uses none" if report["trained_what"].startswith("every token of the text documents,") else ""))
    log(f"rows: {report['rows_read']} read, {report['rows_kept']} kept, {report['rows_refused']} refused; "
        f"{report['train_samples']} training samples, {report['eval_samples']} held out")
    log(f"tokens per sample: mean {report['tokens_mean']:.1f}, p95 {report['tokens_p95']}, max {report['tokens_max']}"
        f"; {report['truncated']} cut at max_length={report['max_length']}")
    log(f"tokens trained: {report['trained_share']:.1%} ({report['trained_what']})")
    for line in refusal_lines(problems):
        log(line)


def write_dump(path: Path, data) -> None:
    """One JSON object per training sample, in the training dataset's order (the trainer shuffles it each epoch with
    train.seed): the row it came from, input_ids, and labels (-100 where no loss)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for origin, sample in zip(data.train_rows, data.train):
            source, row = row_origin(data.sources[origin["source"]], origin["row"])
            handle.write(json.dumps({"source": source, "row": row,
                                     "input_ids": sample["input_ids"], "labels": sample["labels"]}) + "\n")
