"""Data: sources -> row formats -> ChatML with assistant-only labels -> train / held-out datasets.

`sources` reads files, dataset directories and hub datasets; `formats` normalises each row to messages (every
field honoured or the row refused); `template` renders ChatML and masks labels; `prepare` ties them together;
`check` reports on data files for `finetune validate` without a model or tokenizer.
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
from finetune.data.template import CHATML_TEMPLATE, CHATML_TOKENS, encode

__all__ = [
    "CHATML_TEMPLATE", "CHATML_TOKENS", "DATA_SUFFIXES", "ROLES", "SHAREGPT_ROLES", "SIGNATURES", "Conversation",
    "PreparedData", "SourceRows", "build_datasets", "detect_format", "encode", "load_conversations", "normalise",
    "read_records", "read_saved_conversations", "read_source", "save_conversations", "split_held_out", "to_messages",
]
