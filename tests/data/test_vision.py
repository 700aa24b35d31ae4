"""Exact labels for vision-language rows on tiny Qwen2-VL and Idefics3 with their real processors: every answer
token and its end-of-turn token train, nothing else, image tokens never, and the ids are the processor's own."""

import pytest
from PIL import Image

from benchmarks.tiny_vlm import tiny_idefics3, tiny_qwen2_vl
from finetune.data.formats import PLACEHOLDER
from finetune.data.vision import encode_vision

#: Loading two model families' modules takes seconds that the edit loop's tier cannot spare.
pytestmark = pytest.mark.slow

ROWS = [{"role": "user", "content": f"{PLACEHOLDER}What color is this?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": f"And this one? {PLACEHOLDER}"},
        {"role": "assistant", "content": "green, bright"}]


@pytest.fixture(scope="module", params=[tiny_qwen2_vl, tiny_idefics3], ids=["qwen2-vl", "idefics3"])
def processor(request):
    return request.param()[1]


def images():
    return [Image.new("RGB", (80, 60), (200, 30, 30)), Image.new("RGB", (60, 90), (30, 200, 30))]


def trained_text(processor, sample) -> list[str]:
    """The trained tokens, decoded run by run."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(processor.tokenizer.decode(current)), current.clear()
    return runs + ([processor.tokenizer.decode(current)] if current else [])


def test_only_the_answers_and_their_end_of_turn_train_and_image_tokens_never(processor):
    sample = encode_vision(processor, ROWS, images(), max_length=2048)
    end = processor.tokenizer.eos_token
    assert [text.strip() for text in trained_text(processor, sample)] == [f"red{end}", f"green, bright{end}"]
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    image_positions = [i for i, token in enumerate(sample.input_ids) if token == image_id]
    assert image_positions and all(sample.labels[i] == -100 for i in image_positions)
    text = processor.apply_chat_template(
        [{"role": m["role"], "content": c} for m, c in zip(ROWS, [
            [{"type": "image"}, {"type": "text", "text": "What color is this?"}], [{"type": "text", "text": "red"}],
            [{"type": "text", "text": "And this one? "}, {"type": "image"}],
            [{"type": "text", "text": "green, bright"}]])], tokenize=False)
    reference = processor(text=[text], images=[images()], add_special_tokens=False)
    assert sample.input_ids == list(reference["input_ids"][0])  # the processor's own ids, images expanded
    assert set(sample.inputs) >= {"pixel_values"}


def test_a_row_without_images_and_a_cut_through_an_image(processor):
    text_only = encode_vision(processor, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                              [], max_length=64)
    assert [t.strip() for t in trained_text(processor, text_only)] == [f"Yo{processor.tokenizer.eos_token}"]
    full = encode_vision(processor, ROWS, images(), max_length=4096)
    with pytest.raises(ValueError, match="would cut an image's tokens"):
        encode_vision(processor, ROWS, images(), max_length=len(full.input_ids) // 3)
    with pytest.raises(ValueError, match=r"shows 2 image\(s\) for the row's 1"):
        encode_vision(processor, ROWS, images()[:1], max_length=4096)


def test_the_collator_batches_image_and_text_rows_with_their_prepared_labels(processor, tmp_path):
    import json

    import torch

    from finetune.data.images import ImageRef
    from finetune.data.vision import open_image
    from finetune.data.vision_data import VisionCollator

    images()[0].save(tmp_path / "red.png")
    ref = ImageRef("path", str(tmp_path / "red.png"))
    with_image = encode_vision(processor, ROWS[:2], [open_image(ref)], max_length=4096)
    text_only = encode_vision(processor, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                              [], max_length=4096)
    rows = [{"text": s.text, "input_ids": s.input_ids, "labels": s.labels, "image_refs": refs}
            for s, refs in ((text_only, []), (with_image, [json.dumps(ref.record())]))]
    batch = VisionCollator(processor)(rows)
    width = len(with_image.input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    assert batch["labels"][1].tolist() == with_image.labels  # the prepared labels, exactly
    short = len(text_only.input_ids)  # the text row is padded: no attention, no loss there
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (width - short)
    assert batch["labels"][0, short:].eq(-100).all() and batch["labels"][0, :short].tolist() == text_only.labels
    assert torch.is_tensor(batch["pixel_values"]) and batch["pixel_values"].numel() > 0


def test_image_pixel_bounds_scale_with_the_aspect_kept(tmp_path):
    from finetune.data.images import ImageRef
    from finetune.data.vision import open_image

    Image.new("RGB", (400, 100), (1, 2, 3)).save(tmp_path / "wide.png")
    ref = ImageRef("path", str(tmp_path / "wide.png"))
    small = open_image(ref, max_pixels=10_000)
    assert small.width * small.height <= 10_000 and small.width == 4 * small.height
    large = open_image(ref, min_pixels=160_000)
    assert large.width * large.height >= 160_000 and large.size == (800, 200)
    assert open_image(ref, max_pixels=10**6, min_pixels=100).size == (400, 100)  # inside the bounds: untouched
