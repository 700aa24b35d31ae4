"""Exact labels for vision-language rows on tiny Qwen2-VL and Idefics3 with their real processors: every answer
token and its end-of-turn token train, nothing else, image tokens never, and the ids are the processor's own."""

import pytest
from helpers.vlm import tiny_idefics3, tiny_qwen2_vl
from PIL import Image

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
