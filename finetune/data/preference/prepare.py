"""Preference rows prepared for training: read (pairs, or KTO's labelled answers), split with the same seeded draw
as SFT, tokenised into Arrow datasets and cached like SFT data; and the held-out rows as a run saves them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.cache import cache_key, check_token_ids, prepared
from finetune.data.preference.labelled import Labelled, encode_labelled, read_labelled
from finetune.data.preference.pairs import Pair, encode_pair, read_pairs
from finetune.data.rows import check_bad_fraction, ignored_line, split_held_out
from finetune.data.sources import row_name
from finetune.data.template import ChatTemplate
from finetune.errors import UserError
from finetune.paths import write_atomic


@dataclass
class PreparedPairs:
    """What the dpo objective trains on; the fields the training flow reads match PreparedData's."""

    train: Any  # datasets.Dataset: prompt_ids, chosen_ids, rejected_ids
    eval: Any | None
    held_out: list[Pair]
    mean_train_tokens: float  # per row: the prompt twice plus both answers, as the model sees them
    truncated: int = 0
    problems: list[str] = field(default_factory=list)
    rows_read: int = 0
    ignored_lines: list[str] = field(default_factory=list)
    mix: list[dict] = field(default_factory=list)
    cache_line: str | None = None
    streaming: bool = False

    def save_held_out(self, path: Path) -> None:
        """The held-out pairs (or labelled answers) as the run keeps them (held_out.jsonl), for `finetune eval`."""
        save_pairs(self.held_out, path)


def build_pairs(tokenizer, template: ChatTemplate, train: str, train_split: str, eval: str | None, eval_split: str,
                eval_fraction: float, max_length: int, max_bad_fraction: float, seed: int, log=print,
                unpaired: bool = False, cache: bool = True, columns: dict | None = None) -> PreparedPairs:
    """Read, split (seeded, as for SFT) and tokenise preference rows into Arrow datasets on disk, cached like SFT
    data (finetune.data.cache: one process prepares, DDP ranks and later runs read); raise UserError when too many
    rows are bad. On disk, the datasets are one set of files for every rank, where TRL's reference pass writes the
    log-probabilities it computed (an in-memory dataset would leave each rank its own temporary copy).
    `unpaired`: KTO's rows, one answer each with its label (finetune.data.preference.labelled), shuffled with the seed
    here because TRL's KTO reads them in order (its KL estimate pairs each answer with its batch neighbours'
    prompts)."""
    options = {"kind": "unpaired" if unpaired else "pairs", "train_split": train_split, "eval_split": eval_split,
               "eval_fraction": eval_fraction, "max_length": max_length, "seed": seed, "columns": columns or {},
               "names": [train, eval]}  # as for SFT: refusal lines and the held-out rows name the files
    key = cache_key(tokenizer, template, {"train": train, "eval": eval}, options) if cache else None

    def prepare(directory: Path) -> None:
        _prepare_pairs(tokenizer, template, train, train_split, eval, eval_split, eval_fraction, max_length, seed,
                       unpaired, directory, columns)

    data, directory, hit = prepared(key, prepare, lambda entry: _load_pairs(entry, len(tokenizer)), log,
                                    prefix="finetune-pairs-")
    for line in data.ignored_lines:
        log(line)
    check_bad_fraction(data.problems, data.rows_read, max_bad_fraction, log)
    if data.train is None:
        raise UserError(f"{train}: no usable training rows")
    if key is not None:
        data.cache_line = f"data: {'read from' if hit else 'prepared into'} the cache {directory}"
    return data


def _prepare_pairs(tokenizer, template, train, train_split, eval, eval_split, eval_fraction, max_length, seed,
                   unpaired, directory: Path, columns: dict | None = None) -> None:
    """Write the entry: train/ and eval/ datasets, held_out.jsonl and meta.json (cache.write_complete adds the
    manifest that marks it complete)."""
    import random

    import datasets

    if unpaired:
        read, encode = read_labelled, encode_labelled
    else:
        read, encode = read_pairs, encode_pair
    rows, problems, total, ignored = read(train, train_split, columns)
    lines = [ignored_line(train, ignored)]
    if eval is not None:
        held, held_problems, held_total, held_ignored = read(eval, eval_split)
        problems, total = problems + held_problems, total + held_total
        lines.append(ignored_line(eval, held_ignored))
    else:
        rows, held = split_held_out(rows, eval_fraction, seed)
    encoded, truncated = {"train": [], "eval": []}, 0
    for name, group in (("train", rows), ("eval", held)):
        kept = []
        for row in group:
            first = row[0] if unpaired else row  # an unpaired row is a list: a pair's two answers, or one
            try:
                ids, cut = encode(tokenizer, row, max_length, template)
            except ValueError as err:
                problems.append(f"{row_name(first.source, first.row)}: {err}")
                continue
            encoded[name] += ids if unpaired else [ids]
            kept += row if unpaired else [row]
            truncated += cut and name == "train"
        if name == "eval":
            held = kept
    if unpaired:
        random.Random(seed).shuffle(encoded["train"])
    directory.mkdir(parents=True, exist_ok=True)
    for name, samples in encoded.items():
        if samples:  # datasets cannot load back a saved dataset of no rows
            datasets.Dataset.from_dict({k: [r[k] for r in samples] for k in samples[0]}).save_to_disk(
                str(directory / name))
    save_pairs(held, directory / "held_out.jsonl")
    tokens = [sum(len(v) for k, v in r.items() if k.endswith("_ids")) + ("chosen_ids" in r) * len(r["prompt_ids"])
              for r in encoded["train"]]  # as the model sees a row: a pair's prompt twice
    meta = {"problems": problems, "rows_read": total, "ignored_lines": [line for line in lines if line],
            "truncated": truncated, "mean_train_tokens": sum(tokens) / max(len(tokens), 1),
            "mix": [{"source": train, "rows": len(encoded["train"])}]}
    (directory / "meta.json").write_text(json.dumps(meta) + "\n")


def _load_pairs(directory: Path, vocabulary: int) -> PreparedPairs:
    import datasets

    meta = json.loads((directory / "meta.json").read_text())

    def load(name):
        if not (directory / name).is_dir():
            return None
        dataset = datasets.load_from_disk(str(directory / name))
        check_token_ids(dataset, vocabulary, name)
        return dataset

    return PreparedPairs(train=load("train"), eval=load("eval"),
                         held_out=read_saved_pairs(directory / "held_out.jsonl"),
                         mean_train_tokens=meta["mean_train_tokens"], truncated=meta["truncated"],
                         problems=meta["problems"], rows_read=meta["rows_read"], ignored_lines=meta["ignored_lines"],
                         mix=meta["mix"])


def save_pairs(rows: list, path: Path) -> None:
    """A run's held-out pairs (or KTO's labelled answers) as JSON lines, for `finetune eval`; written whole
    (finetune.paths.write_atomic)."""
    write_atomic(path, "".join(json.dumps(row.to_json()) + "\n" for row in rows))


def read_saved_pairs(path: Path) -> list:
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [Labelled(**r) if "label" in r else Pair(**r) for r in rows]


def is_saved_pairs(path: Path) -> bool:
    """Whether a run's held_out.jsonl holds preference rows (pairs, or KTO's labelled answers), not conversations."""
    with path.open(encoding="utf-8") as handle:
        first = handle.readline()
    return bool(first.strip()) and ("chosen" in json.loads(first) or "label" in json.loads(first))
