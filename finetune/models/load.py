"""Every `from_pretrained` lives here: model and tokenizer loading, the chat template a run trains with, dtype and
attention."""

from __future__ import annotations

import pickle
from pathlib import Path

from finetune.data.shards import is_glob
from finetune.data.template import chat_template as template_of
from finetune.data.template import choose_template, stop_token_ids
from finetune.errors import UserError
from finetune.models import hub, inputs
from finetune.models.gguf import converted_dir, ensure_embedded, import_gguf
from finetune.models.registry import LOCAL_MODEL
from finetune.models.weights import check_adapter_dir, check_model_dir, pickle_refused


def resolve_model_path(name_or_path: str, log=print, role: str = "model.name_or_path",
                       expected: str = inputs.AS_MODEL) -> str:
    """A local model directory for what names a model: an alias or a GGUF file (by content, whatever its name;
    converted once, cached) becomes one; hub ids pass through. Anything else is refused by what it is."""
    item, gguf = _model_input(name_or_path, role, expected)
    if item.kind == inputs.ALIAS:
        return str(ensure_embedded(name_or_path, log))
    if gguf is not None:
        target = converted_dir(gguf)
        if not (target / "config.json").exists():
            import_gguf(gguf, target, log)
        return str(target)
    return str(item.path) if item.kind == inputs.MODEL_DIR else name_or_path


def _model_input(name_or_path: str, role: str, expected: str):
    """What names a model, and the GGUF file it is or holds (None for other kinds); anything that is no model is
    refused by what it is, before anything is converted or loaded."""
    item = inputs.identify(name_or_path)
    if item.kind not in inputs.MODEL_KINDS:
        raise inputs.refusal(item, role, expected)
    return item, inputs.gguf_file(item, role, expected) if item.kind in (inputs.GGUF, inputs.GGUF_DIR) else None


def check_sources(recipe) -> None:
    """What a recipe reads, checked before a run dir is claimed or a library loads: the model by what it is, and
    each name only the hub resolves (model or data) against a hub that cannot be reached."""
    model, d = recipe.model.name_or_path, recipe.data
    item, _ = _model_input(model, "model.name_or_path", inputs.AS_MODEL)
    if item.kind == inputs.HUB:
        hub.require_hub(model, "model.name_or_path", LOCAL_MODEL)
    for name in (d.eval, *(source.path for source in d.train_sources())):
        if name and not is_glob(name) and inputs.identify(name).kind == inputs.HUB:
            hub.require_hub(name, "data", hub.LOCAL_DATA, "dataset")


def saved_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer as saved at `path` (no template chosen, no tokens added), or one UserError saying why not."""
    from transformers import AutoTokenizer

    if inputs.identify(path).kind == inputs.HUB:
        hub.require_hub(path, "model", LOCAL_MODEL)
    elif Path(path).is_dir() and inputs.tokenizer_missing(Path(path)):  # else transformers blames sentencepiece
        raise UserError(f"{path}: no tokenizer files ({', '.join(inputs.TOKENIZER_FILES)}); the model directory is "
                        "incomplete (a copy or save cut short?). Copy it again from its source")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise UserError(f"could not load a tokenizer from `{path}`: {err}") from None


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str = "auto"):
    """The tokenizer with the chat template a run trains with (`data.chat_template`: auto, chatml, model or a
    .jinja path). Returns (tokenizer, ids of tokens added for ChatML)."""
    tokenizer = saved_tokenizer(path, trust_remote_code)
    try:
        text, _, missing = choose_template(tokenizer, chat_template)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    if missing:
        # Base models (Llama-2, ...) lack the ChatML markers; as text they would cost ~6 tokens each and be
        # split inconsistently, so they become special tokens whose embedding rows the method must train.
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    added = tokenizer.convert_tokens_to_ids(missing)
    tokenizer.chat_template = text
    return with_pad_token(tokenizer), added


def with_pad_token(tokenizer):
    """The tokenizer, with a pad token when it has none."""
    if tokenizer.pad_token is None:
        # Padding never reaches the loss (labels are -100 there), so any token will do; eos is always present.
        tokenizer.pad_token = tokenizer.eos_token or "<|im_end|>"
    return tokenizer


def template_for(tokenizer, chat_template: str = "auto", fold_system: bool = False, where: str = "model"):
    """The loaded tokenizer's template with its end-of-turn token (finetune.data.template.ChatTemplate)."""
    name = None if chat_template in ("auto", "chatml", "model") else chat_template
    try:
        return template_of(tokenizer, name, fold_system)
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None


def write_generation_config(directory: Path, tokenizer, base: str | None = None) -> list[int]:
    """Make `generate()` stop on the trained end-of-turn token: generation_config.json in `directory` (a saved model,
    an adapter, a merged model) gets it among its eos_token_id, keeping the base's own stop tokens and settings.
    Returns the stop ids written."""
    from transformers import GenerationConfig

    config = None
    for source in (directory, base):
        if source is not None and (Path(source) / "generation_config.json").is_file():
            config = GenerationConfig.from_pretrained(source)
            break
    config = config or GenerationConfig(bos_token_id=tokenizer.bos_token_id)
    given = config.eos_token_id
    stops = list(dict.fromkeys([*(given if isinstance(given, list) else [given] if given is not None else []),
                                *stop_token_ids(tokenizer)]))
    config.eos_token_id = stops if len(stops) > 1 else stops[0]
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(directory)
    return stops


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    # fp16 keeps fp32 master weights; the trainer's fp16 autocast does the rest (see ModelSection.dtype).
    return {"bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}[name]


def resolve_attention(name: str) -> str:
    import torch

    from finetune.deps import installed

    if name != "auto":
        return name
    if torch.cuda.is_available() and installed("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def load_model(path: str, dtype, attn_implementation: str, trust_remote_code: bool = False,
               vocab_size: int | None = None, **load_kwargs):
    """The causal LM in the given dtype and attention implementation, embeddings grown to `vocab_size`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    if inputs.identify(path).kind == inputs.HUB:
        hub.require_hub(path, "model", LOCAL_MODEL)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            **load_kwargs,
        )
    except pickle.UnpicklingError as err:  # torch's weights-only loading refused a pickle: nothing was run
        raise UserError(pickle_refused(path, err)) from None
    except (OSError, ValueError, ImportError, SafetensorError) as err:
        raise UserError(f"could not load model `{path}`: {err}") from None
    if vocab_size is not None and vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size, mean_resizing=True)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return model


def load_adapter(model, adapter_dir: Path):
    """`model` with the peft adapter saved in `adapter_dir` applied; its files are checked first."""
    from peft import PeftModel
    from safetensors import SafetensorError

    check_adapter_dir(adapter_dir)
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))  # a str: peft takes a Path for a hub id
    except pickle.UnpicklingError as err:
        raise UserError(pickle_refused(adapter_dir, err)) from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # RuntimeError: shapes that do not fit
        raise UserError(f"{adapter_dir}: could not apply the LoRA adapter to its base model: {err}") from None
