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


#: Module names of the part that maps vision features into the language model's space (LLaVA and Gemma-3's
#: multi_modal_projector, Idefics3's connector, Qwen2-VL's merger): it trains with the language model in full
#: fine-tuning, as LLaMA-Factory's default (freeze_vision_tower, not the projector) does.
PROJECTOR_NAMES = ("projector", "connector", "merger")


def load_vision_model(path: str, dtype, attn_implementation: str, trust_remote_code: bool = False, **load_kwargs):
    """The vision-language model (transformers' AutoModelForImageTextToText) in the given dtype and attention."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForImageTextToText

    from finetune.models.weights import check_model_dir, pickle_refused

    check_model_dir(path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            **load_kwargs)
    except pickle.UnpicklingError as err:
        raise UserError(pickle_refused(path, err)) from None
    except (OSError, ValueError, ImportError, SafetensorError) as err:
        raise UserError(f"could not load vision-language model `{path}`: {err}") from None
    model.config.use_cache = False
    return model


def language_prefix(model) -> str:
    """The module path of the language model inside a vision-language model (`model.language_model` for Qwen2-VL,
    `model.text_model` for Idefics3), from transformers' own get_decoder; "" for a text-only model."""
    if not hasattr(model.config, "vision_config"):
        return ""
    decoder = model.get_decoder()
    return next(name for name, module in model.named_modules() if module is decoder)


def vision_parts(model) -> dict[str, list[str]]:
    """Module paths of the parts beside the language model: {"tower": [...], "projector": [...]}; empty for a text
    model. The projector may sit inside the tower (Qwen2-VL's `visual.merger`)."""
    prefix = language_prefix(model)
    if not prefix:
        return {"tower": [], "projector": []}
    parent = prefix.rpartition(".")[0]
    siblings = [f"{parent}.{name}" if parent else name
                for name, _ in (model.get_submodule(parent) if parent else model).named_children()
                if (f"{parent}.{name}" if parent else name) != prefix]
    projector = [name for name, _ in model.named_modules()
                 if name.rsplit(".", 1)[-1] in {*PROJECTOR_NAMES, "multi_modal_projector"}
                 and any(name == s or name.startswith(s + ".") for s in siblings)]
    return {"tower": [s for s in siblings if s not in projector], "projector": projector}


def freeze_vision_tower(model) -> int:
    """Freeze the vision encoder (not the projector); the number of parameters frozen."""
    in_frozen_tower = frozen_tower(model)
    frozen = 0
    for name, param in model.named_parameters():
        if ".lora_" in name:  # peft's adapter weights (lora_A, lora_B, ...) on the tower train when targeted
            continue
        if in_frozen_tower(name) and param.requires_grad:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def frozen_tower(model):
    """A predicate on parameter names: inside the vision encoder and outside the projector (what stays frozen
    unless model.train_vision_tower); always false for a text-only model."""
    parts = vision_parts(model)

    def inside(name: str) -> bool:
        return (any(name.startswith(t + ".") for t in parts["tower"])
                and not any(name.startswith(p + ".") for p in parts["projector"]))
    return inside


def language_model_filter(model):
    """A predicate on module names: inside the language model (always true for a text-only model). The prefix is
    found once: finding it walks every module."""
    prefix = language_prefix(model)
    return lambda name: not prefix or name == prefix or name.startswith(prefix + ".")

def vision_recipe_problems(recipe) -> list[str]:
    """What a recipe asks that finetune cannot do on a vision-language model yet, each with the way out (validate
    and train say the same)."""
    from finetune.recipe.text import known_text

    d, t = recipe.data, recipe.train
    sources = d.train_sources()
    problems = []
    if any(known_text(s.path, s.format) for s in sources):
        problems.append("raw text (data.format text, .txt/.md files) with a vision-language model: not supported "
                        "yet; train raw text on a text-only model, or give this one conversations (with images)")
    elif t.packing:
        problems.append("train.packing with a vision-language model: not supported yet (each row's images are "
                        "batched with it); turn it off")
    if d.streaming:
        problems.append("data.streaming with a vision-language model: not supported yet; prepare the data up front")
    if len(sources) > 1:
        problems.append("data.sources with a vision-language model: mixtures are not supported yet; give one "
                        "`data.train`")
    if recipe.objective.name not in ("sft", "dpo"):
        problems.append(f"objective {recipe.objective.name} with a vision-language model: not supported yet; "
                        "objectives sft and dpo train on image rows")
    if d.chat_template != "auto":
        problems.append(f"data.chat_template {d.chat_template} with a vision-language model: its processor's own "
                        "template renders the images; leave it at auto")
    return problems
