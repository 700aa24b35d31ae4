"""A vision-language model's training data: image rows read, checked and encoded with exact labels
(finetune.data.vision), split into training and held-out rows, and batched by the model's own processor.

What is kept between runs is the decoded rows (the rendered text, its ids and labels, and each image's reference),
not pixel values: a processor's pixels are several MB per image (Qwen2-VL at its default bound: 1176 floats per
14x14 patch), more than the images themselves, so each batch's images are opened and processed when the batch is
built, by the same processor call that checked them here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.data.cache import cache_key, prepared
from finetune.data.images import ImageRef
from finetune.data.pipeline import progress_bars
from finetune.data.prepare import PreparedData
from finetune.data.rows import (
    Conversation,
    check_bad_fraction,
    read_saved_conversations,
    read_source,
    save_conversations,
    split_held_out,
)
from finetune.data.sources import row_name
from finetune.data.vision import VisionSample, encode_vision, open_image
from finetune.errors import UserError


@dataclass
class Encoded:
    conversation: Conversation
    sample: VisionSample


def encode_rows(processor, source, data, problems: list[str]) -> tuple[list[Encoded], int]:
    """Every row of one source encoded (refused rows appended to `problems` with file:row); and the rows read."""
    read = read_source(source.path, source.split, source.format, columns=getattr(source, "columns", None),
                       media=True)
    if read.format == "text":
        raise UserError(f"{source.path}: raw text (a lone `text` field) with a vision-language model: not supported "
                        "yet; train raw text on a text-only model, or give this one conversations (with images)")
    problems += read.problems
    encoded = []
    for conversation in read.rows:
        try:
            images = [open_image(ref, data.image_max_pixels, data.image_min_pixels)
                      for ref in conversation.images or []]
            sample = encode_vision(processor, conversation.messages, images, data.max_length)
        except (ValueError, OSError) as err:
            problems.append(f"{row_name(conversation.source, conversation.row)}: {err}")
            continue
        encoded.append(Encoded(conversation, sample))
    return encoded, read.total


def build_vision_data(processor, recipe, log) -> PreparedData:
    """The recipe's image rows as PreparedData: `train` and `eval` datasets of input_ids, labels, the rendered
    text and the images' references (VisionCollator batches them), kept in the prepared-data cache
    (finetune.data.cache) under a key of the data files, the processor and the options; an entry whose images
    changed on disk since (size or modification time) is prepared again."""
    d = recipe.data
    [source] = d.train_sources()  # one: finetune.models.vision.vision_recipe_problems refuses mixtures
    key = vision_cache_key(processor, recipe, source, "vision-sft")
    data, directory, hit = prepared(key, lambda where: _prepare(processor, recipe, source, where),
                                    _load, log, prefix="finetune-vision-")
    check_bad_fraction(data.problems, max(data.rows_read, 1), d.max_bad_fraction, log)
    if len(data.train) == 0:
        raise UserError(f"{source.path}: no usable training rows")
    images = sum(len(refs) for refs in data.train["image_refs"])
    data.cache_line = (f"data: {len(data.train)} rows for training ({images} images), "
                       f"{len(data.eval) if data.eval is not None else 0} held out; " + kept_line(key, hit, directory))
    return data


def vision_cache_key(processor, recipe, source, kind: str) -> str | None:
    """The cache key of a VLM preparation: the data files, the processor (tokenizer, image processor, template) and
    the options; None with data.cache off."""
    d = recipe.data
    options = {"kind": kind, "source": source.key(), "eval": d.eval, "eval_split": d.eval_split,
               "eval_fraction": d.eval_fraction, "max_length": d.max_length, "seed": recipe.train.seed,
               "pixels": [d.image_max_pixels, d.image_min_pixels],
               "processor": json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str),
               "template": processor.chat_template}
    return cache_key(processor.tokenizer, None, {"train": source.path, "eval": d.eval}, options) if d.cache else None


def kept_line(key: str | None, hit: bool, directory: Path) -> str:
    """What the start says about where the decoded rows are kept."""
    where = f"{'read from' if hit else 'prepared into'} the cache {directory}" if key else "prepared (data.cache off)"
    return f"the decoded rows (not pixels, computed per batch) {where}"


def _prepare(processor, recipe, source, directory: Path) -> None:
    d, seed = recipe.data, recipe.train.seed
    problems = []
    train, read = encode_rows(processor, source, d, problems)
    held = []
    if d.eval is not None:
        from finetune.data.mixture import Source

        held, total = encode_rows(processor, Source(d.eval, d.eval_split, d.format), d, problems)
        read += total
    else:  # the seeded split every preparation draws (over the rows that encoded)
        train, held = split_held_out(train, d.eval_fraction, seed)
    directory.mkdir(parents=True, exist_ok=True)
    with progress_bars([source.path]):  # datasets' saving bar: noise for a small set
        for name, rows in (("train", train), ("eval", held)):
            if rows:  # datasets cannot load back a saved dataset of no rows
                _dataset(rows).save_to_disk(str(directory / name))
    save_conversations([e.conversation for e in held], directory / "held_out.jsonl")
    lengths = [len(e.sample.input_ids) for e in train]
    meta = {"source": source.path, "rows_read": read, "problems": problems,
            "truncated": sum(e.sample.truncated for e in train), "tokens": sum(lengths),
            "images": fingerprints(e.conversation.images or [] for e in train + held)}
    (directory / "meta.json").write_text(json.dumps(meta) + "\n")


def _load(directory: Path) -> PreparedData:
    import datasets

    meta = json.loads((directory / "meta.json").read_text())
    check_fingerprints(meta["images"])
    train = datasets.load_from_disk(str(directory / "train")) if (directory / "train").is_dir() else \
        datasets.Dataset.from_dict({"input_ids": [], "labels": [], "text": [], "image_refs": []})
    held = datasets.load_from_disk(str(directory / "eval")) if (directory / "eval").is_dir() else None
    source = meta["source"]
    return PreparedData(
        train=train, eval=held, eval_conversations=read_saved_conversations(directory / "held_out.jsonl"),
        mean_train_tokens=meta["tokens"] / max(len(train), 1), problems=meta["problems"], sources=[source],
        rows_read=meta["rows_read"], truncated=meta["truncated"], cache=str(directory),
        mix=[{"source": source, "rows": len(train), "samples": len(train), "tokens": meta["tokens"]}])


def check_fingerprints(images: dict[str, list[int]]) -> None:
    """ValueError (the cache then prepares the entry again) when an image file changed since it was prepared."""
    for path, (size, mtime) in images.items():
        stat = Path(path).stat() if Path(path).is_file() else None
        if stat is None or (stat.st_size, stat.st_mtime_ns) != (size, mtime):
            raise ValueError(f"image {path} changed or went away since the rows were prepared")


def fingerprints(groups) -> dict[str, list[int]]:
    """Size and modification time of each local image file the rows name (URLs and inline images have none)."""
    found = {}
    for refs in groups:
        for ref in refs:
            if ref.kind == "path" and ref.value not in found:
                stat = Path(ref.value).stat()
                found[ref.value] = [stat.st_size, stat.st_mtime_ns]
    return found


def _dataset(rows: list[Encoded]):
    import datasets

    return datasets.Dataset.from_dict({
        "input_ids": [e.sample.input_ids for e in rows],
        "labels": [e.sample.labels for e in rows],
        "text": [e.sample.text for e in rows],
        # "images" would make TRL treat the set as raw vision rows to render again; these are references only
        "image_refs": [[json.dumps(ref.record()) for ref in e.conversation.images or []] for e in rows],
    })


def image_refs(saved: list[str]) -> list[ImageRef]:
    """The dataset's image references back as ImageRefs (inline bytes were kept as base64)."""
    import base64

    records = [json.loads(text) for text in saved]
    return [ImageRef(r["kind"], base64.b64decode(r["value"]) if r["kind"] == "bytes" else r["value"])
            for r in records]


class VisionCollator:
    """A batch of encoded image rows through the model's processor: it gives the pixel tensors in whatever layout
    the family's forward takes (Qwen2-VL's patches concatenated with a grid per image, Idefics3's padded tiles with
    their mask, ...). Ids and labels are the ones prepared: the processor's ids must start with them (a row cut at
    max_length is cut here too, its tail masked out), so labels stay exact."""

    def __init__(self, processor, max_pixels: int | None = None, min_pixels: int | None = None):
        self.processor, self.max_pixels, self.min_pixels = processor, max_pixels, min_pixels

    def __call__(self, rows: list[dict]):
        return self.batch([(row["text"], row["input_ids"], row["labels"], row["image_refs"]) for row in rows])

    def batch(self, sequences: list[tuple]) -> dict:
        """(text, ids, labels, image references) per sequence -> the model's inputs with `labels`."""
        import torch

        images = [[open_image(ref, self.max_pixels, self.min_pixels) for ref in image_refs(refs)]
                  for *_, refs in sequences]
        batch = self.processor(text=[text for text, *_ in sequences], images=images if any(images) else None,
                               padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False)
        width = max(len(ids) for _, ids, *_ in sequences)
        ids = batch["input_ids"]
        labels = torch.full((len(sequences), width), -100, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, (_, row_ids, row_labels, _) in enumerate(sequences):
            n = len(row_ids)
            if ids[i, :n].tolist() != list(row_ids):
                raise RuntimeError("the processor encodes a prepared row differently now; prepare the data again "
                                   "with the processor the run loads")
            labels[i, :n], mask[i, :n] = torch.tensor(row_labels), 1
        per_token = {key: value[:, :width] for key, value in batch.items()
                     if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == ids.shape}
        return {**batch, **per_token, "attention_mask": mask, "labels": labels}
