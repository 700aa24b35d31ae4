"""`finetune eval` on preference rows: does the model rank the chosen answer above the rejected one?

Two measures, on exactly the pairs a dpo run held out (or a `--data` file of pairs):
- preference accuracy: the share of pairs whose chosen answer has the higher log-probability given the prompt (the
  answer the model would rather generate). Defined for any model, so base and tuned compare directly.
- DPO's implicit reward (arXiv:2305.18290, section 5): beta x (log pi(answer) - log pi_base(answer)). Reward accuracy
  is the share of pairs whose chosen answer gains more than the rejected one, the margin its mean difference: what
  TRL logs as rewards/accuracies and rewards/margins during training, here on held-out pairs against the base.
"""

from __future__ import annotations

from finetune.data.preference import Pair, encode_pair
from finetune.data.template import ChatTemplate
from finetune.errors import UserError

KEYS = ("preference_accuracy", "logp_margin", "reward_accuracy", "reward_margin", "rows")


def answer_logps(model, tokenizer, pairs: list[Pair], template: ChatTemplate, max_length: int,
                 batch_size: int) -> tuple[list[float], list[float]]:
    """The summed log-probability of each pair's chosen and rejected answer (end of turn included) given its
    prompt, as training scores them."""
    import torch

    sequences = []  # (ids, index where the answer starts), chosen then rejected per pair
    for pair in pairs:
        try:
            ids, _ = encode_pair(tokenizer, pair, max_length, template)
        except ValueError as err:
            raise UserError(f"{pair.source}:{pair.row}: {err}") from None
        prompt = ids["prompt_ids"]
        sequences += [(prompt + ids["chosen_ids"], len(prompt)), (prompt + ids["rejected_ids"], len(prompt))]
    scores = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        answer = torch.zeros_like(ids, dtype=torch.bool)
        for row, (tokens, begin) in enumerate(batch):
            answer[row, begin:len(tokens)] = True
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        scores += (logps * answer[:, 1:]).sum(dim=1).tolist()
    return scores[0::2], scores[1::2]


def pair_metrics(chosen: list[float], rejected: list[float], base: tuple[list[float], list[float]] | None = None,
                 beta: float = 0.1) -> dict:
    """The measures of the module docstring; the reward ones need the base's log-probabilities."""
    n = max(len(chosen), 1)
    metrics = {"preference_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
               "logp_margin": sum(c - r for c, r in zip(chosen, rejected)) / n, "rows": len(chosen)}
    if base is not None:
        gains = [(c - bc) - (r - br) for c, r, bc, br in zip(chosen, rejected, *base)]
        metrics.update(reward_accuracy=sum(g > 0 for g in gains) / n, reward_margin=beta * sum(gains) / n)
    return metrics


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| model | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    for name, metrics in results.items():
        cells = [f"{metrics[k]:.4f}" if isinstance(metrics.get(k), float) else str(metrics.get(k, "-")) for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_rows(pairs: list[Pair], scores: dict[str, tuple[list[float], list[float]]]) -> list[dict]:
    """Each pair's prompt, answers and every model's log-probabilities, for eval.json."""
    return [{"prompt": pair.prompt[-1]["content"] if pair.prompt else "", "chosen": pair.chosen.get("content", ""),
             "rejected": pair.rejected.get("content", ""),
             **{name: {"chosen_logp": c[i], "rejected_logp": r[i]} for name, (c, r) in scores.items()}}
            for i, pair in enumerate(pairs)]
