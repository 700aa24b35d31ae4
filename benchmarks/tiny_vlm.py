"""Random vision-language models built from their configs, with their real processors' code and a byte-level
tokenizer carrying each family's special tokens (no download anywhere): the tiny ones the tests train, and a
SmolVLM-256M-shaped one that benchmarks/vlm_plan.py measures the memory plan on.

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


def images_only_qwen2_vl(image_processor, tokenizer, chat_template, family):
    """`family`, Qwen2-VL's processor class or Qwen2.5-VL's (the same image path), for images alone."""
    from transformers.processing_utils import ProcessorMixin

    class ImagesOnly(family):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImagesOnly(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


#: The language model every tiny VLM here shares: 2 Llama-shaped layers of width 64.
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}


def tiny_qwen2_vl(seed: int = 0):
    """(model, processor): 2 language layers of width 64, a 2-block vision tower; images of 56x56 to 112x112
    pixels (4 to 16 image tokens after the 2x2 merge)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    return _tiny_qwen(seed, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor,
                      {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3})


def tiny_qwen2_5_vl(seed: int = 0):
    """(model, processor): Qwen2.5-VL's architecture (windowed attention in the vision blocks, full attention in the
    listed ones, an MLP merger), 2 language layers of width 64; Qwen2-VL's image sizes."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    return _tiny_qwen(seed, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                      {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "fullatt_block_indexes": [1]})


def _tiny_qwen(seed: int, config_class, model_class, processor_class, vision: dict):
    """A Qwen2-VL-family model of TINY_TEXT with `vision`, and its processor for images alone."""
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(special_tokens=QWEN2_VL_TOKENS, eos="<|im_end|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_TOKENS}
    processor = images_only_qwen2_vl(Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112),
                                     tokenizer, QWEN2_VL_TEMPLATE, processor_class)
    torch.manual_seed(seed)
    config = config_class(
        text_config={"vocab_size": len(tokenizer), **TINY_TEXT, "max_position_embeddings": 512,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]},
        vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return model_class(config), processor


def tiny_idefics3(seed: int = 0):
    """(model, processor): SmolVLM's architecture, 2 language layers of width 64, one vision layer on 32-pixel tiles;
    an image becomes up to 4 tiles and a global view of 4 tokens each."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    processor = idefics3_processor(image_edge=64, tile=32, image_seq_len=4)
    torch.manual_seed(seed)
    config = idefics3_config(
        processor, text={"vocab_size": len(processor.tokenizer), **TINY_TEXT},
        vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "image_size": 32, "patch_size": 8})
    return Idefics3ForConditionalGeneration(config), processor


def idefics3_processor(image_edge: int, tile: int, image_seq_len: int):
    """Idefics3's processor with its PIL image processor: images scaled to `image_edge` pixels on the longest side,
    cut into `tile`-pixel tiles of `image_seq_len` tokens each."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = build_tokenizer(special_tokens=IDEFICS3_TOKENS, eos="<end_of_utterance>")
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": image_edge},
                                                max_image_size={"longest_edge": tile})
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=IDEFICS3_TEMPLATE,
                             image_seq_len=image_seq_len)


def idefics3_config(processor, text: dict, vision: dict, scale_factor: int = 2):
    from transformers import Idefics3Config

    return Idefics3Config(text_config={"model_type": "llama", "max_position_embeddings": 8192, **text},
                          vision_config=vision, scale_factor=scale_factor,
                          image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"))


def smolvlm_shaped(path, text_layers: int = 30, vision_layers: int = 12) -> None:
    """A SmolVLM-256M-shaped Idefics3 (SmolLM2-135M's language model, a SigLIP-base-sized encoder on 512-pixel
    tiles, 64 tokens per tile; fewer layers where asked) saved as config and processor only: benchmarks build its
    weights at random."""
    processor = idefics3_processor(image_edge=512, tile=512, image_seq_len=64)
    config = idefics3_config(
        processor, text={"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                         "num_hidden_layers": text_layers, "num_attention_heads": 9, "num_key_value_heads": 3,
                         "tie_word_embeddings": True},
        vision={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": vision_layers,
                "num_attention_heads": 12, "image_size": 512, "patch_size": 16}, scale_factor=4)
    config.save_pretrained(path)
    processor.save_pretrained(path)


#: A ChatML template whose image parts render as LLaVA's `<image>` placeholder.
LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA3_TOKENS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                 "<image_soft_token>")
#: Gemma-3's published template, reduced to what the tests use (the model's turns are `model`).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}")


def tiny_llava(seed: int = 0):
    """(model, processor): LLaVA-1.5's architecture (a CLIP encoder, one token per 14-pixel patch after its CLS),
    2 language layers of width 64; images become 28x28 crops of 4 tokens."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return _tiny_llava(seed, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, CLIPImageProcessorPil)


def tiny_gemma3(seed: int = 0):
    """(model, processor): Gemma-3's architecture (a SigLIP encoder pooled to a fixed count of image tokens, and
    bidirectional attention over them, which token_type_ids mark), 2 language layers of width 64; 56x56 images of
    4 tokens."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = build_tokenizer(special_tokens=GEMMA3_TOKENS, eos="<end_of_turn>")
    tokenizer.bos_token = "<bos>"
    # Gemma-3's tokenizer names its image tokens; its processor reads them from there
    for name, token in (("boi", "<start_of_image>"), ("eoi", "<end_of_image>"), ("image", "<image_soft_token>")):
        setattr(tokenizer, f"{name}_token", token)
        setattr(tokenizer, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 56, "width": 56}),
                                tokenizer=tokenizer, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    torch.manual_seed(seed)
    config = Gemma3Config(
        text_config={"vocab_size": len(tokenizer), **TINY_TEXT, "head_dim": 16, "sliding_window": 64},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 56, "patch_size": 14, "vision_use_head": False},
        mm_tokens_per_image=4, boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id)
    return Gemma3ForConditionalGeneration(config), processor


def tiny_llava_next(seed: int = 0):
    """(model, processor): LLaVA-NeXT's architecture (any-resolution: an image becomes a base view and the tiles of
    the best-fitting grid, each 4 tokens), 2 language layers of width 64."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return _tiny_llava(seed, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor,
                       LlavaNextImageProcessorPil, grids=[[28, 28], [28, 56], [56, 28], [56, 56]])


def _tiny_llava(seed: int, config_class, model_class, processor_class, image_processor_class, grids=None):
    """A LLaVA-family model of TINY_TEXT with a 2-layer CLIP encoder on 28-pixel crops; `grids`: LLaVA-NeXT's
    any-resolution grids."""
    import torch

    tokenizer = build_tokenizer(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"))
    anyres = {"image_grid_pinpoints": grids} if grids else {}
    processor = processor_class(
        image_processor=image_processor_class(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                              **anyres),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1)
    torch.manual_seed(seed)
    config = config_class(
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), **TINY_TEXT},
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", **anyres)
    return model_class(config), processor
