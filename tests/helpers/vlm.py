"""Tiny random vision-language models built from their configs, with their real processors' code and a byte-level
tokenizer carrying each family's special tokens (no download anywhere).

transformers' fast image and video processors need torchvision, which has no CPU build for this torch on PyPI, so
the processors here use the PIL image processors; Qwen2-VL's processor insists on a video processor, so it is built
for images alone (`images_only_qwen2_vl`), its image path unchanged."""

from __future__ import annotations

from benchmarks.tiny import build_tokenizer

QWEN2_VL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>")
#: Qwen2-VL's published template, reduced to what the tests use (content parts: image and text).
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IDEFICS3_TOKENS = ("<|endoftext|>", "<|im_start|>", "<fake_token_around_image>", "<image>", "<global-img>",
                   "<end_of_utterance>")
#: SmolVLM's (Idefics3) published template.
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def images_only_qwen2_vl(image_processor, tokenizer, chat_template):
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImagesOnly(Qwen2VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImagesOnly(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def tiny_qwen2_vl(seed: int = 0):
    """(model, processor): 2 language layers of width 64, a 2-block vision tower; images of 56x56 to 112x112
    pixels (4 to 16 image tokens after the 2x2 merge)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(special_tokens=QWEN2_VL_TOKENS, eos="<|im_end|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_TOKENS}
    processor = images_only_qwen2_vl(Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112),
                                     tokenizer, QWEN2_VL_TEMPLATE)
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 512, "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2VLForConditionalGeneration(config), processor


def tiny_idefics3(seed: int = 0):
    """(model, processor): SmolVLM's architecture, 2 language layers of width 64, one vision layer on 32-pixel tiles;
    an image becomes up to 4 tiles and a global view of 4 tokens each."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = build_tokenizer(special_tokens=IDEFICS3_TOKENS, eos="<end_of_utterance>")
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  chat_template=IDEFICS3_TEMPLATE, image_seq_len=4)
    torch.manual_seed(seed)
    config = Idefics3Config(
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64,
                     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 512},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    return Idefics3ForConditionalGeneration(config), processor
