"""Data: sources -> rows (normalised messages, no tokenizer) -> the chat template with assistant-only labels ->
train / held-out datasets.

`sources` reads files, dataset directories and hub datasets; `formats` normalises each row to messages (every
field honoured or the row refused) and `tools` its tool calls; `rows` holds what a source gave and the held-out
split; `template` renders a row with the run's chat template (the model's own or ChatML) and masks labels exactly;
`prepare` ties them together (`pipeline` over processes, `cache` on disk, `stream` for streamed sources, `mixture`
for several); `preference/` does the same for pairs and labelled answers; `check` reports on data files for
`finetune validate` without a model or tokenizer; `inspect` is `finetune data`.
"""
