"""Data: sources -> row formats -> the chat template with assistant-only labels -> train / held-out datasets.

`sources` reads files, dataset directories and hub datasets; `formats` normalises each row to messages (every
field honoured or the row refused) and `tools` its tool calls; `template` renders a row with the run's chat template
(the model's own or ChatML) and masks labels exactly; `prepare` ties them together; `check` reports on data files
for `finetune validate` without a model or tokenizer; `inspect` is `finetune data`.
"""

from finetune.data.formats import ROLES, SHAREGPT_ROLES, SIGNATURES, detect_format, normalise, to_messages
from finetune.data.prepare import (
    Conversation,
    PreparedData,
    SourceRows,
    build_datasets,
    load_conversations,
    read_saved_conversations,
    read_source,
    save_conversations,
    split_held_out,
)
from finetune.data.sources import DATA_SUFFIXES, read_records
from finetune.data.template import (CHATML_TEMPLATE, CHATML_TOKENS, ChatTemplate, chat_template, encode,
                                     encode_samples)

__all__ = [
    "CHATML_TEMPLATE", "CHATML_TOKENS", "ChatTemplate", "DATA_SUFFIXES", "chat_template", "encode_samples", "ROLES", "SHAREGPT_ROLES", "SIGNATURES", "Conversation",
    "PreparedData", "SourceRows", "build_datasets", "detect_format", "encode", "load_conversations", "normalise",
    "read_records", "read_saved_conversations", "read_source", "save_conversations", "split_held_out", "to_messages",
]
