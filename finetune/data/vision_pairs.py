"""Preference rows with images, for objective dpo on a vision-language model: each row's images sit in its prompt
(content parts or `<image>` placeholders with `images`, finetune.data.images), both answers follow the same prompt,
and each sequence is encoded with exact spans by the processor's template (finetune.data.vision). The prompt must
encode the same before both answers, or the row is refused, as for text pairs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.cache import prepared
from finetune.data.images import extract_images
from finetune.data.pipeline import progress_bars
from finetune.data.preference.pairs import Pair, normalise_pair, read_rows
from finetune.data.preference.prepare import PreparedPairs, save_pairs
from finetune.data.rows import check_bad_fraction, row_folder, split_held_out
from finetune.data.sources import row_name
from finetune.data.vision import encode_vision, open_image
from finetune.data.vision_data import (
    VisionCollator,
    check_fingerprints,
    fingerprints,
    kept_line,
    vision_cache_key,
)
from finetune.errors import UserError


@dataclass
class VisionPair(Pair):
    images: list = field(default_factory=list)  # ImageRefs, in the prompt's placeholder order

    def to_json(self) -> dict:
        return {**super().to_json(), "images": [image.record() for image in self.images]}


def read_vision_pairs(source: str, split: str, columns: dict | None = None):
    """Every row of a source as a VisionPair (finetune.data.preference.pairs.read_rows)."""
    def pair(record, source, number):
        record, images = extract_images(record, row_folder(source, number))
        prompt, chosen, rejected, extra = normalise_pair(record, media=True)
        return VisionPair(prompt, chosen, rejected, source, number, None, images), extra

    return read_rows(source, split, lambda record: "chosen" in record and "rejected" in record, lambda keys: (
        "objective dpo trains on preference rows (`prompt` with `chosen` and `rejected` answers), and this row "
        f"has keys {keys}"), pair, columns)


def encode_vision_pair(processor, pair: VisionPair, data) -> dict:
    """The row's two sequences (text, ids, labels: the final answer alone trains) and its image references."""
    images = [open_image(ref, data.image_max_pixels, data.image_min_pixels) for ref in pair.images]
    context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in pair.prompt]  # earlier answers: context
    row, prompts = {"image_refs": [json.dumps(ref.record()) for ref in pair.images]}, []
    for name, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        sample = encode_vision(processor, context + [answer], images, data.max_length)
        trained = [i for i, label in enumerate(sample.labels) if label != -100]
        if not trained:
            raise ValueError(f"the prompt fills data.max_length={data.max_length}: no {name} token is left")
        prompts.append(sample.input_ids[:trained[0]])
        row.update({f"{name}_text": sample.text, f"{name}_input_ids": sample.input_ids,
                    f"{name}_labels": sample.labels})
    if prompts[0] != prompts[1]:
        raise ValueError("the processor's template encodes the prompt differently before the two answers")
    return row


def encode_pairs(processor, pairs: list[VisionPair], data, problems: list[str]) -> list[tuple[VisionPair, dict]]:
    """Each pair with its encoded sequences; a refused pair is appended to `problems` with file:row."""
    encoded = []
    for pair in pairs:
        try:
            encoded.append((pair, encode_vision_pair(processor, pair, data)))
        except (ValueError, OSError) as err:
            problems.append(f"{row_name(pair.source, pair.row)}: {err}")
    return encoded


def build_vision_pairs(processor, recipe, log) -> PreparedPairs:
    """The recipe's preference rows with images, split and encoded (held-out rows kept for `finetune eval`), kept in
    the prepared-data cache as finetune.data.vision_data keeps SFT's rows (prepared again when an image changes)."""
    d, [source] = recipe.data, recipe.data.train_sources()
    key = vision_cache_key(processor, recipe, source, "vision-dpo")
    data, directory, hit = prepared(key, lambda where: _prepare(processor, recipe, source, where), _load, log,
                                    prefix="finetune-vision-")
    check_bad_fraction(data.problems, max(data.rows_read, 1), d.max_bad_fraction, log)
    if data.train is None:
        raise UserError(f"{source.path}: no usable preference rows")
    data.cache_line = (f"data: {len(data.train)} preference rows with images for training, {len(data.held_out)} held "
                       "out; " + kept_line(key, hit, directory))
    return data


def _prepare(processor, recipe, source, directory: Path) -> None:
    import datasets

    d = recipe.data
    rows, problems, total, _ = read_vision_pairs(source.path, source.split, source.columns)
    if d.eval is not None:
        held, held_problems, held_total, _ = read_vision_pairs(d.eval, d.eval_split)
        problems, total = problems + held_problems, total + held_total
    else:
        rows, held = split_held_out(rows, d.eval_fraction, recipe.train.seed)
    encoded = {"train": encode_pairs(processor, rows, d, problems), "eval": encode_pairs(processor, held, d, problems)}
    directory.mkdir(parents=True, exist_ok=True)
    with progress_bars([source.path]):
        for name, items in encoded.items():
            if items:  # datasets cannot load back a saved dataset of no rows
                datasets.Dataset.from_list([row for _, row in items]).save_to_disk(str(directory / name))
    save_pairs([pair for pair, _ in encoded["eval"]], directory / "held_out.jsonl")
    tokens = [len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for _, r in encoded["train"]]
    meta = {"source": source.path, "rows_read": total, "problems": problems,
            "mean_train_tokens": sum(tokens) / max(len(tokens), 1),
            "images": fingerprints(pair.images for pair, _ in encoded["train"] + encoded["eval"])}
    (directory / "meta.json").write_text(json.dumps(meta) + "\n")


class _Saved(dict):
    """A held-out pair as the cache kept it, written back to the run's held_out.jsonl as it is."""

    def to_json(self) -> dict:
        return dict(self)


def _load(directory: Path) -> PreparedPairs:
    import datasets

    meta = json.loads((directory / "meta.json").read_text())
    check_fingerprints(meta["images"])

    def load(name):
        return datasets.load_from_disk(str(directory / name)) if (directory / name).is_dir() else None

    held = [_Saved(json.loads(line)) for line in (directory / "held_out.jsonl").read_text().splitlines() if line]
    train = load("train")
    return PreparedPairs(train=train, eval=load("eval"), held_out=held,
                         mean_train_tokens=meta["mean_train_tokens"], problems=meta["problems"],
                         rows_read=meta["rows_read"], mix=[{"source": meta["source"],
                                                            "rows": len(train) if train is not None else 0}])


class VisionPairCollator(VisionCollator):
    """TRL's DPO batch layout (every chosen sequence, then every rejected one, with `completion_mask` marking the
    answers) built by the processor, images repeated for both halves."""

    def __call__(self, rows: list[dict]):
        import torch

        sequences = [(row[f"{name}_text"], row[f"{name}_input_ids"], row[f"{name}_labels"], row["image_refs"])
                     for name in ("chosen", "rejected") for row in rows]
        batch = self.batch(sequences)
        batch["completion_mask"] = (batch.pop("labels") != -100).long()
        for name in ("ref_chosen_logps", "ref_rejected_logps"):  # a precomputed reference, as TRL's collator
            if name in rows[0]:
                batch[name] = torch.tensor([row[name] for row in rows])
        return batch
