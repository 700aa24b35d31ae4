"""Vision-language models: which model directories are one (their config has a vision tower), and their processor
(the image processor, the tokenizer and the chat template together)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import UserError


def is_vision_language(model_path: str) -> bool:
    """Whether the model at `model_path` takes images: its config.json names a vision tower."""
    config = Path(model_path) / "config.json"
    try:
        return "vision_config" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def load_processor(model_path: str, trust_remote_code: bool = False):
    """The model's processor, or one UserError saying why it cannot be had (transformers' video processors, which
    Qwen2-VL's processor insists on, need torchvision)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError, ValueError, AttributeError) as err:
        hint = "; pip install torchvision (the fast image and video processors need it)" if "torchvision" in str(
            err) or "VIDEO_PROCESSOR" in str(err) else ""
        raise UserError(f"{model_path}: a vision-language model whose processor could not be loaded: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}{hint}") from None
    if getattr(processor, "image_processor", None) is None or not getattr(processor, "chat_template", None):
        raise UserError(f"{model_path}: a vision-language model, but what it saves is no processor with an image "
                        "processor and a chat template (processor_config.json, chat_template.jinja)")
    return processor
