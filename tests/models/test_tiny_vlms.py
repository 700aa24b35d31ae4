"""The tiny vision-language models the image tests build on: each family's real processor expands an image into
the number of image tokens its vision tower produces, in the place the chat template put it, and the model trains
on the batch (a finite loss with gradients in the language and vision layers)."""

import pytest
import torch
from helpers.vlm import tiny_idefics3, tiny_qwen2_vl
from PIL import Image

#: Loading two model families' modules takes seconds that the edit loop's tier cannot spare.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("build", [tiny_qwen2_vl, tiny_idefics3], ids=["qwen2-vl", "idefics3"])
def test_a_tiny_vlm_and_its_processor_place_and_count_image_tokens(build):
    model, processor = build()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(text=[text], images=[[Image.new("RGB", (80, 60), (200, 30, 30))]], return_tensors="pt")
    image_id = model.config.image_token_id
    positions = (batch["input_ids"][0] == image_id).nonzero().flatten()
    expected = (int(batch["image_grid_thw"].prod()) // 4 if "image_grid_thw" in batch  # Qwen2-VL: 2x2 patches merge
                else processor.image_seq_len * batch["pixel_values"].shape[1])  # Idefics3: per tile and global view
    assert len(positions) == expected > 0
    answer = processor.tokenizer("red", add_special_tokens=False)["input_ids"]
    ids = batch["input_ids"][0].tolist()
    start = max(i for i in range(len(ids)) if ids[i:i + len(answer)] == answer)
    assert positions.max() < start  # the image sits in the user's turn, before the answer
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    vision = [p for n, p in model.named_parameters() if "visual" in n or "vision" in n]
    assert vision and all(p.grad is not None for p in vision[:1])
