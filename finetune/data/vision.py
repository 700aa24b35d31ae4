"""Exact labels for a vision-language model's rows.

The processor's chat template renders the row with an image part where each `<image>` placeholder sat
(finetune.data.images); the answer spans come from prefix renderings as for text (finetune.data.template: turn k's
trained text is what `messages[:k+1]` adds to `messages[:k]` with the generation prompt, up to and including the
end-of-turn token). The text is tokenised with one image token per image, labelled, and only then expanded: each
image token becomes the processor's own expansion of that image (its many image tokens, and for Idefics3 the tile
markers around them), all with label -100, and the result must equal the processor's expansion of the whole row
token for token, or the row is refused. So image tokens never train and every answer token does, whatever the
family's expansion looks like.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from finetune.data.formats import PLACEHOLDER
from finetune.data.images import ImageRef
from finetune.data.template import tokenise_spans

#: What a probe answer looks like, to find the token a template ends an assistant turn with.
_PROBE = "Probe answer 7"
#: Seconds to fetch an image named by URL.
URL_TIMEOUT = 30


@dataclass
class VisionSample:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss: every image token, every token outside the answers
    inputs: dict[str, Any]  # the processor's tensors for this row (pixel_values, image_grid_thw, ...)
    truncated: bool
    text: str = ""  # the row as the processor's template renders it (the batch collator runs the processor on it)


def content_parts(messages: list[dict]) -> list[dict]:
    """Each turn's text as content parts, an image part where each `<image>` placeholder sits (the shape the
    processors' templates take)."""
    turns = []
    for message in messages:
        pieces = message["content"].split(PLACEHOLDER)
        parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
        for piece in pieces[1:]:
            parts += [{"type": "image"}] + ([{"type": "text", "text": piece}] if piece else [])
        turns.append({**message, "content": parts})
    return turns


def open_image(ref: ImageRef, max_pixels: int | None = None, min_pixels: int | None = None):
    """The image as RGB (URLs fetched now; a failure is the row's ValueError), scaled (aspect kept) into the
    recipe's pixel bounds, so the bound holds whatever resizing the model family's own processor does after."""
    image = _decoded(ref)
    pixels = image.width * image.height
    bound = max_pixels if max_pixels and pixels > max_pixels else min_pixels if min_pixels and pixels < min_pixels \
        else None
    if bound is None:
        return image
    scale, whole = (bound / pixels) ** 0.5, math.floor if pixels > bound else math.ceil  # stay inside the bound
    return image.resize((max(1, whole(image.width * scale)), max(1, whole(image.height * scale))))


def _decoded(ref: ImageRef):
    from PIL import Image

    if ref.kind == "url":
        from urllib.request import urlopen

        try:
            with urlopen(ref.value, timeout=URL_TIMEOUT) as response:  # noqa: S310 - the data names it
                data = response.read()
        except OSError as err:
            raise ValueError(f"image {ref.value}: could not be fetched ({err})") from None
        return Image.open(io.BytesIO(data)).convert("RGB")
    return Image.open(ref.value if ref.kind == "path" else io.BytesIO(ref.value)).convert("RGB")


def encode_vision(processor, messages: list[dict], images: list, max_length: int) -> VisionSample:
    """Ids, labels and the processor's tensors of one row (PIL images in placeholder order); ValueError says why a
    row cannot be encoded exactly."""
    tokenizer, template = processor.tokenizer, processor.chat_template
    if any(m["role"] == "assistant" and PLACEHOLDER in m["content"] for m in messages):
        raise ValueError("an image in an assistant turn: the model generates text, so images belong in the user's "
                         "turns")
    chat = content_parts(messages)

    def render(turns, generation_prompt=False):
        return processor.apply_chat_template(turns, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    full, end_of_turn = render(chat), _end_of_turn(processor, render)
    spans = []
    for k, message in enumerate(chat):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        prompt = render(chat[:k], generation_prompt=True)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders earlier turns differently once an answer follows; rows "
                             "with images need a template that keeps them as they were")
        end = full.find(end_of_turn, len(prompt))
        if end < 0:
            raise ValueError(f"the chat template renders no {end_of_turn} after assistant turn {k + 1}")
        spans.append((len(prompt), end + len(end_of_turn)))
    flat = tokenise_spans(tokenizer, full, spans, max_length=10**9)
    shown = flat.input_ids.count(_image_token_ids(processor)[0])
    if shown != len(images):
        raise ValueError(f"the chat template shows {shown} image(s) for the row's {len(images)}")
    batch = processor(text=[full], images=[images] if images else None, return_tensors="pt",
                      add_special_tokens=False)
    ids, labels = _expanded(processor, flat.input_ids, flat.labels, images, batch["input_ids"][0].tolist())
    inputs = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask")}
    if len(ids) <= max_length:
        return VisionSample(ids, labels, inputs, False, full)
    image_ids = set(_image_token_ids(processor))
    if any(token in image_ids for token in ids[max_length:]):
        raise ValueError(f"with its images the row is {len(ids)} tokens, and max_length={max_length} would cut an "
                         "image's tokens (raise data.max_length; or, for a processor whose image tokens grow with "
                         "the image, as Qwen2-VL's, bound data.image_max_pixels)")
    per_token = {key: value[..., :max_length] for key, value in inputs.items() if value.shape[-1] == len(ids)}
    return VisionSample(ids[:max_length], labels[:max_length], {**inputs, **per_token}, True, full)


def _end_of_turn(processor, render) -> str:
    """The special token right after an answer in the processor's template."""
    tokenizer = processor.tokenizer
    probe = render([{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": _PROBE}]}])
    if _PROBE not in probe:
        raise ValueError("the processor's chat template does not show an assistant answer it is given")
    after = probe[probe.rfind(_PROBE) + len(_PROBE):].lstrip()
    added = (t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    specials = sorted({*tokenizer.all_special_tokens, *added}, key=len, reverse=True)
    found = next((token for token in specials if token and after.startswith(token)), None)
    if found is None:
        raise ValueError(f"the processor's chat template ends an answer with {after[:20]!r}, no special token")
    return found


def _image_token_ids(processor) -> list[int]:
    token = getattr(processor, "image_token", None) or PLACEHOLDER
    return [processor.tokenizer.convert_tokens_to_ids(token)]


def _expanded(processor, ids: list[int], labels: list[int], images: list, expected: list[int]):
    """`ids` with each image token replaced by the processor's expansion of its image, labelled -100; checked
    against the processor's expansion of the whole row."""
    (image_id,) = _image_token_ids(processor)
    positions = [i for i, token in enumerate(ids) if token == image_id]
    out_ids, out_labels, last = [], [], 0
    for position, image in zip(positions, images):
        expansion = processor(text=[processor.tokenizer.convert_ids_to_tokens(image_id)], images=[[image]],
                              add_special_tokens=False)["input_ids"][0]
        out_ids += ids[last:position] + list(expansion)
        out_labels += labels[last:position] + [-100] * len(expansion)
        last = position + 1
    out_ids, out_labels = out_ids + ids[last:], out_labels + labels[last:]
    if out_ids != expected:
        raise ValueError("the processor expands the row's images differently from each image alone, so its image "
                         "tokens cannot be told apart from the text exactly")
    return out_ids, out_labels
