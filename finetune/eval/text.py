"""`finetune eval` on raw text: held-out perplexity over every token of the held-out documents, cut into blocks as
the run trained them (its data.max_length, overlap and separators), and no exact match (a document has no answer).
"""

from __future__ import annotations

import math
from pathlib import Path

from finetune.data.rows import Conversation
from finetune.data.sources import row_name
from finetune.data.text import TextOptions, document_samples
from finetune.errors import UserError

#: Block length for a target that is no run and comes with no recipe (the schema's default data.max_length).
DEFAULT_MAX_LENGTH = 1024
#: The columns of eval.md for a text-only evaluation.
TEXT_KEYS = ["loss", "perplexity", "documents", "tokens"]


def text_settings(target: str, recipe: Path | None) -> tuple[int, TextOptions]:
    """(max_length, TextOptions) the documents are cut with: the recipe's when given, else the run's recipe.yaml,
    else the defaults."""
    import yaml

    path = recipe if recipe is not None else Path(target) / "recipe.yaml"
    try:
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError):
        data = {}
    options = TextOptions(data.get("text_column", "text"), data.get("split_on", "document"), data.get("overlap", 0),
                          data.get("document_bos"), data.get("document_eos", True))
    return int(data.get("max_length", DEFAULT_MAX_LENGTH)), options


def document_loss(model, tokenizer, rows: list[Conversation], batch_size: int, max_length: int,
                  options: TextOptions) -> dict:
    """Token-weighted mean cross-entropy over every trained token of the documents (overlap context excepted), each
    block scored on its own as training scored it."""
    import torch
    import torch.nn.functional as F

    from finetune.eval.targets import right_padded

    blocks = []
    for row in rows:
        try:
            blocks += [(s.input_ids, s.labels) for s in document_samples(tokenizer, row.text, max_length, options)]
        except ValueError as err:
            raise UserError(f"{row_name(row.source, row.row)}: {err}") from None
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size]
        ids, mask = right_padded([i for i, _ in batch], tokenizer.pad_token_id or 0)
        labels, _ = right_padded([lab for _, lab in batch], -100)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(mean), "documents": len(rows), "tokens": count}
