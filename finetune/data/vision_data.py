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

from finetune.data.images import ImageRef
from finetune.data.prepare import PreparedData
from finetune.data.rows import Conversation, check_bad_fraction, held_out_indices, read_source
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
    text and the images' references (VisionCollator batches them)."""
    d, seed = recipe.data, recipe.train.seed
    if len(d.train_sources()) > 1:
        raise UserError("data.sources with a vision-language model: mixtures are not supported yet; give one "
                        "`data.train`")
    problems, train, read = [], [], 0
    for source in d.train_sources():
        rows, total = encode_rows(processor, source, d, problems)
        train, read = train + rows, read + total
    held = []
    if d.eval is not None:
        from finetune.data.mixture import Source

        held, total = encode_rows(processor, Source(d.eval, d.eval_split, d.format), d, problems)
        read += total
    elif d.eval_fraction > 0:
        chosen = set(held_out_indices([e.conversation.row for e in train], d.eval_fraction, seed))
        held = [e for e in train if e.conversation.row in chosen]
        train = [e for e in train if e.conversation.row not in chosen]
    check_bad_fraction(problems, max(read, 1), d.max_bad_fraction, log)
    if not train:
        raise UserError(f"{d.train or d.sources[0].path}: no usable training rows")
    lengths = [len(e.sample.input_ids) for e in train]
    images = sum(len(e.conversation.images or []) for e in train)
    log(f"data: {len(train)} image rows for training ({images} images), {len(held)} held out; decoded rows kept, "
        "pixels computed per batch by the processor")
    source = str(d.train or d.sources[0].path)
    return PreparedData(
        train=_dataset(train), eval=_dataset(held) if held else None,
        eval_conversations=[e.conversation for e in held], mean_train_tokens=sum(lengths) / len(lengths),
        problems=problems, sources=[source], rows_read=read, truncated=sum(e.sample.truncated for e in train),
        mix=[{"source": source, "rows": len(train), "samples": len(train), "tokens": sum(lengths)}])


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
