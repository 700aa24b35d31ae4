"""Tokenizers of each chat-model family, built locally: that family's special tokens and its published chat template
(the `chat_template` of each model's tokenizer_config.json on the hub, kept in tests/fixtures/templates/)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.tiny import build_tiny_llama, build_tokenizer

TEMPLATES = Path(__file__).parents[1] / "fixtures" / "templates"

#: family -> (special tokens, bos, eos, template file or None for ChatML added by finetune, end-of-turn token,
#: how an answer's trained text reads: the content and what the template puts around it up to the end of turn)
FAMILIES = {
    # meta-llama/Meta-Llama-3-8B-Instruct: eos <|end_of_text|> in the base config, turns end with <|eot_id|>.
    "llama3": (("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               "<|begin_of_text|>", "<|end_of_text|>", "llama3.jinja", "<|eot_id|>", "{}<|eot_id|>"),
    # Qwen/Qwen2.5-7B-Instruct
    "qwen2.5": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "qwen2.5.jinja", "<|im_end|>",
                "{}<|im_end|>"),
    # mistralai/Mistral-7B-Instruct-v0.2: [INST] is text; no system role; strict alternation.
    "mistral": (("<unk>", "<s>", "</s>"), "<s>", "</s>", "mistral.jinja", "</s>", "{}</s>"),
    # google/gemma-7b-it: no system role; strict alternation.
    "gemma": (("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", "gemma.jinja",
              "<end_of_turn>", "{}<end_of_turn>"),
    # microsoft/Phi-3-mini-4k-instruct: a conversation without a generation prompt ends with eos.
    "phi3": (("<|endoftext|>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<s>", "<|endoftext|>",
             "phi3.jinja", "<|end|>", "{}<|end|>"),
    # meta-llama/Llama-2-7b-chat-hf: answers are " {content} </s>".
    "llama2": (("<unk>", "<s>", "</s>"), "<s>", "</s>", "llama2.jinja", "</s>", " {} </s>"),
    # mistralai/Mistral-Nemo-Instruct-2407: the system prompt is shown only in the last user turn.
    "mistral-nemo": (("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                      "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), "<s>", "</s>", "mistral-nemo.jinja",
                     "</s>", "{}</s>"),
    # A base model with no template: finetune's ChatML, its tokens added.
    "chatml": (("<|endoftext|>",), None, "<|endoftext|>", None, "<|im_end|>", "{}<|im_end|>"),
}


def family_tokenizer(family: str):
    specials, bos, eos, template, _, _ = FAMILIES[family]
    tokenizer = build_tokenizer(special_tokens=specials + ("<|endoftext|>",) * ("<|endoftext|>" not in specials),
                                eos=eos)
    if bos:
        tokenizer.bos_token = bos
    if template:
        tokenizer.chat_template = (TEMPLATES / template).read_text()
    return tokenizer


def family_model_dir(family: str, path: Path) -> Path:
    """A tiny Llama whose config names this family's bos/eos, saved with the family's tokenizer."""
    tokenizer = family_tokenizer(family)
    tokenizer.save_pretrained(path)
    model = build_tiny_llama(len(tokenizer))
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    return path
