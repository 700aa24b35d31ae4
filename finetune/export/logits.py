"""The logit-agreement check `finetune merge` and `finetune export` share: a few held-out rows through two models
(or one model before and after a change), and the largest |logit difference| between them."""

from __future__ import annotations

#: Tokens of a held-out row fed to the models (its prompt and answer as training encoded them, truncated here).
PROBE_TOKENS = 512


def probe_ids(tokenizer, rows: list, fallback: list[int]) -> list[list[int]]:
    """Each row's token ids as training encoded them (prompt and answer); `fallback` alone when there are none."""
    from finetune.data.template import encode_samples

    return [encode_samples(tokenizer, r.messages, PROBE_TOKENS, r.tools)[0].input_ids for r in rows] or [fallback]


def probe_logits(model, probes: list[list[int]]):
    """The model's logits on each probe, one forward pass per row (no padding to disturb them), computed as they are
    drawn: comparing two such streams holds one row's logits of each model at a time."""
    import torch

    for probe in probes:  # token ids, or a vision-language model's processor outputs (vision_probes)
        with torch.no_grad():
            logits = model(**probe).logits if isinstance(probe, dict) else model(input_ids=torch.tensor([probe])).logits
        yield logits


def vision_probes(processor, rows: list) -> list[dict]:
    """Held-out image rows as the processor encodes them (images and all), one batch of one per row; a short text
    when there are none."""
    from finetune.data.vision import content_parts, open_image

    probes = []
    for row in rows:
        text = processor.apply_chat_template(content_parts(row.messages), tokenize=False)
        images = [open_image(ref) for ref in row.images or []]
        probes.append(dict(processor(text=[text], images=[images] if images else None, return_tensors="pt",
                                     add_special_tokens=False)))
    return probes or [dict(processor(text=["Hello, world"], return_tensors="pt"))]


def max_logit_diff(before, after) -> float:
    """The largest |logit difference| between two sequences of per-row logits (probe_logits of two models)."""
    return max((a - b).abs().max().item() for a, b in zip(before, after))
