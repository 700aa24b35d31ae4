"""Raw text (continued pretraining): documents become blocks of token ids in which every token trains.

A document is the tokenizer's BOS (when the tokenizer adds one to what it encodes, or `data.document_bos` says so),
the document's ids, and EOS (`data.document_eos`), so that packed documents are separated the way the model saw
documents in pretraining. A document longer than `max_length` is split into consecutive blocks, never cut: each
block after the first starts `overlap` tokens before the previous one ended, and those repeated tokens are context
only (label -100), so every token of the document is trained exactly once. An empty or blank document has nothing
to train and is skipped; the preparation counts it (`finetune data` and the start summary say how many).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from finetune.data.template import Sample


class EmptyDocument(ValueError):
    """A text row whose text is empty or blank: skipped and counted, not refused (it is no malformed row)."""


@dataclass(frozen=True)
class TextOptions:
    """How text rows are read and cut into samples (the recipe's data.text_column, split_on, overlap,
    document_bos, document_eos)."""

    column: str = "text"
    split_on: str = "document"
    overlap: int = 0
    bos: bool | None = None  # None: as the tokenizer does when it encodes text
    eos: bool = True

    def key(self) -> dict:
        return asdict(self)

    def columns(self, columns: dict | None) -> dict:
        """A source's field mapping with the text column added (a source's own mapping of `text` wins)."""
        columns = dict(columns or {})
        if self.column != "text":
            columns.setdefault("text", self.column)
        return columns


def document_ids(tokenizer, text: str, options: TextOptions) -> list[int]:
    """The document's token ids with its separators."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = options.bos if options.bos is not None else _adds_bos(tokenizer)
    if bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("data.document_bos is true but the tokenizer has no BOS token")
        ids.insert(0, tokenizer.bos_token_id)
    if options.eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to end a document with; set data.document_eos: false")
        ids.append(tokenizer.eos_token_id)
    return ids


def resolved(options: TextOptions, tokenizer) -> TextOptions:
    """The options with `bos` decided for this tokenizer (asked once, not once per document)."""
    return options if options.bos is not None else replace(options, bos=_adds_bos(tokenizer))


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS before what it encodes (Llama's do; GPT-2's, Qwen's and SmolLM's don't)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def blocks(ids: list[int], max_length: int, overlap: int) -> list[Sample]:
    """The document in blocks of at most max_length tokens; a later block repeats the `overlap` tokens before it as
    context, labelled -100 because the block before has trained them already."""
    out, start = [], 0
    while True:
        context = 0 if start == 0 else min(overlap, start)
        end = min(len(ids), start - context + max_length)
        piece = ids[start - context:end]
        out.append(Sample(piece, [-100] * context + piece[context:], False))
        if end >= len(ids):
            return out
        start = end


def document_samples(tokenizer, text: str, max_length: int, options: TextOptions) -> list[Sample]:
    """A document's blocks; EmptyDocument when it has no text."""
    if not text.strip():
        raise EmptyDocument("empty document")
    return blocks(document_ids(tokenizer, text, options), max_length, options.overlap)


def text_stats(rows, lengths, trained: int) -> dict:
    """What a text source gave: documents, blocks, tokens, the documents split across blocks and the tokens trained
    (the rest are overlap context). `rows`: each block's document (its row), in order; `lengths`: each block's
    tokens (numpy arrays); `trained`: the blocks' trained tokens."""
    import numpy as np

    documents, per_document = np.unique(rows, return_counts=True) if len(rows) else (rows, rows)
    return {"documents": int(len(documents)), "blocks": int(len(rows)), "tokens": int(lengths.sum()),
            "trained": int(trained), "split": int((per_document > 1).sum()),
            "split_blocks": int(per_document[per_document > 1].sum())}


def text_line(source: str, stats: dict, max_length: int, overlap: int) -> str:
    """One line of the start summary and `finetune data` for a text source."""
    line = (f"text {source}: {count(stats['documents'], 'document')}, {count(stats['blocks'], 'block')} of at most "
            f"{max_length} tokens, {stats['tokens']} tokens")
    if stats.get("empty"):
        line += f"; {count(stats['empty'], 'empty document')} skipped"
    if stats["split"]:
        repeated = stats["tokens"] - stats["trained"]
        line += (f"; {count(stats['split'], 'document')} longer than max_length split into "
                 f"{stats['split_blocks']} blocks "
                 f"(nothing cut" + (f"; {repeated} overlap tokens repeated as context, trained once)"
                                    if overlap else ")"))
    else:
        line += "; none longer than max_length (nothing cut)"
    return line


def count(n: int, noun: str) -> str:
    """`n` and the noun, plural unless n is 1."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def raw_text_template(tokenizer):
    """The template a recipe of raw text alone carries through preparation: the tokenizer's own when it has one
    (nothing changes), else a stand-in that renders nothing. ChatML's markers are never added for raw text: a base
    model would gain two tokens (and their trained embedding rows) that no document uses."""
    from finetune.data.template import ChatTemplate, chat_template

    try:
        return chat_template(tokenizer)
    except ValueError:
        return ChatTemplate("", "none (raw text)", tokenizer.eos_token or "", tokenizer.eos_token_id or 0, False)
