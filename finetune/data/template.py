"""ChatML rendering and assistant-only labels on exact token ids."""

from __future__ import annotations

#: ChatML with `{% generation %}` markers around what the assistant must learn to produce: its content and
#: the `<|im_end|>` that ends its turn (a model not trained on it never learns to stop). The markers change
#: nothing when rendering for inference; they only feed `return_assistant_tokens_mask`. An assistant turn with
#: `weight` 0 (OpenAI's "context only") renders byte for byte the same, outside the markers, so it carries no loss.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' and (message['weight'] is not defined or message['weight'] != 0) %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def encode(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside trained assistant turns), cut to max_length."""
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=CHATML_TEMPLATE,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = list(out["input_ids"])[:max_length]
    mask = list(out["assistant_masks"])[:max_length]
    return ids, [token if keep else -100 for token, keep in zip(ids, mask)]
