"""`finetune eval` on preference rows: does the model rank the chosen answer above the rejected one?

Two measures, on exactly the pairs a dpo run held out (or a `--data` file of pairs):
- preference accuracy: the share of pairs whose chosen answer has the higher log-probability given the prompt (the
  answer the model would rather generate). Defined for any model, so base and tuned compare directly.
- DPO's implicit reward (arXiv:2305.18290, section 5): beta x (log pi(answer) - log pi_base(answer)). Reward accuracy
  is the share of pairs whose chosen answer gains more than the rejected one, the margin its mean difference: what
  TRL logs as rewards/accuracies and rewards/margins during training, here on held-out pairs against the base.
A kto run's held-out rows are single answers with a label: `label_accuracy` is the share whose reward against the
base has the label's sign (desirable above 0, undesirable below), with the mean reward of each kind.
"""

from __future__ import annotations

from pathlib import Path

from finetune.data.preference.pairs import Pair, encode_answer
from finetune.data.rows import split_held_out
from finetune.data.sources import row_name
from finetune.data.template import ChatTemplate
from finetune.errors import UserError
from finetune.eval.targets import Target, eval_template, right_padded, score_candidates, write_report

KEYS = ("preference_accuracy", "logp_margin", "reward_accuracy", "reward_margin", "rows")
LABELLED_KEYS = ("label_accuracy", "desirable_reward", "undesirable_reward", "desirable_logp", "undesirable_logp",
                 "rows")


def answer_logps(model, tokenizer, rows: list, template: ChatTemplate, max_length: int,
                 batch_size: int) -> tuple[list[float], list[float]]:
    """The summed log-probability of each answer (end of turn included) given its prompt, as training scores them:
    (chosen, rejected) per pair, or (answers, []) for a kto run's labelled answers."""
    import torch

    sequences = []  # (ids, index where the answer starts): a pair's chosen then its rejected
    for row in rows:
        answers = (row.chosen, row.rejected) if isinstance(row, Pair) else (row.completion,)
        for answer in answers:
            try:
                prompt, ids, _ = encode_answer(tokenizer, row.prompt, answer, row.tools, max_length, template)
            except ValueError as err:
                raise UserError(f"{row_name(row.source, row.row)}: {err}") from None
            sequences.append((prompt + ids, len(prompt)))
    scores = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        ids, mask = right_padded([i for i, _ in batch], tokenizer.pad_token_id)
        answer = torch.zeros_like(ids, dtype=torch.bool)
        for row, (tokens, begin) in enumerate(batch):
            answer[row, begin:len(tokens)] = True
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        scores += (logps * answer[:, 1:]).sum(dim=1).tolist()
    return (scores[0::2], scores[1::2]) if rows and isinstance(rows[0], Pair) else (scores, [])


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


def labelled_metrics(scores: list[float], labels: list[bool], base: list[float] | None = None,
                     beta: float = 0.1) -> dict:
    """A kto run's measures (module docstring); the reward ones need the base's log-probabilities."""
    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    metrics = {"desirable_logp": mean([s for s, good in zip(scores, labels) if good]),
               "undesirable_logp": mean([s for s, good in zip(scores, labels) if not good]), "rows": len(scores)}
    if base is not None:
        rewards = [beta * (s - b) for s, b in zip(scores, base)]
        metrics.update(label_accuracy=mean([(r > 0) == good for r, good in zip(rewards, labels)]),
                       desirable_reward=mean([r for r, good in zip(rewards, labels) if good]),
                       undesirable_reward=mean([r for r, good in zip(rewards, labels) if not good]))
    return metrics


def sample_rows(rows: list, scores: dict[str, tuple[list[float], list[float]]]) -> list[dict]:
    """Each row's prompt, answers and every model's log-probabilities, for eval.json."""
    samples = []
    for i, row in enumerate(rows):
        prompt = row.prompt[-1]["content"] if row.prompt else ""
        if isinstance(row, Pair):
            samples.append({"prompt": prompt, "chosen": row.chosen.get("content", ""),
                            "rejected": row.rejected.get("content", ""),
                            **{name: {"chosen_logp": c[i], "rejected_logp": r[i]} for name, (c, r) in scores.items()}})
        else:
            samples.append({"prompt": prompt, "completion": row.completion.get("content", ""), "label": row.label,
                            **{name: {"logp": c[i]} for name, (c, _) in scores.items()}})
    return samples


def held_out_pairs(target: str, recipe_path: Path | None, data: Path | None):
    """The preference pairs to evaluate when the rows are pairs (a dpo run's, a pairs file, a dpo recipe's held-out
    source), else None: the rows are conversations."""
    from finetune.data.preference.labelled import read_labelled
    from finetune.data.preference.pairs import is_preference_record, read_pairs
    from finetune.data.preference.prepare import is_saved_pairs, read_saved_pairs
    from finetune.data.sources import read_records

    def checked(pairs, problems, source):
        if problems:
            raise UserError(f"{source}: {len(problems)} malformed rows, e.g. {problems[0]}")
        return pairs

    if data is not None:
        first = next((r for _, r in read_records(str(data), "test") if isinstance(r, dict)), None)
        if first is None or not is_preference_record(first):
            return None
        return checked(*read_pairs(str(data), "test")[:2], data)
    if recipe_path is not None:
        from finetune.recipe.load import load_recipe

        recipe = load_recipe(recipe_path)
        d, kind = recipe.data, recipe.objective.data_kind
        if kind == "conversations":
            return None

        def read(source, split, columns=None):  # a kto recipe's rows are lists of labelled answers (a pair: two)
            rows, problems = (read_labelled if kind == "unpaired" else read_pairs)(source, split, columns)[:2]
            return ([a for row in rows for a in row] if kind == "unpaired" else rows), problems, rows

        if d.eval is not None:
            return checked(*read(d.eval, d.eval_split)[:2], d.eval)
        if d.eval_fraction > 0:
            [source] = d.train_sources()
            held = split_held_out(read(source.path, source.split, source.columns)[2], d.eval_fraction,
                                  recipe.train.seed)[1]
            return [a for row in held for a in row] if kind == "unpaired" else held
        raise UserError(f"{recipe_path}: the recipe has no held-out data (data.eval or data.eval_fraction)")
    saved = Path(target) / "held_out.jsonl"
    if saved.exists() and is_saved_pairs(saved):
        return read_saved_pairs(saved)
    return None


def run_preference_eval(target: str, where: Target, pairs: list, batch_size: int, recipe: Path | None,
                        log=print) -> dict:
    """Preference accuracy of the model (and, for a run, its base and the DPO reward against it) on the pairs;
    writes eval.json and eval.md like the SFT evaluation."""
    if not pairs:
        raise UserError(f"{target}: no held-out preference pairs; pass --data FILE")
    saved = (Path(recipe) if recipe else Path(target) / "recipe.yaml")
    objective, beta, max_length = _saved_objective(saved)

    def score(name, model, tokenizer, progress):
        progress.add_task(f"eval {name} on {len(pairs)} pairs", total=None)
        template = eval_template(tokenizer, where.fold_system)
        return answer_logps(model, tokenizer, pairs, template, max_length, batch_size)

    scores = score_candidates(where, where.base_path is not None, score)  # the reward is against the base
    labelled = not isinstance(pairs[0], Pair)
    if labelled:  # a kto run's answers, each with its label
        labels = [row.label for row in pairs]
        results = {name: labelled_metrics(s[0], labels, scores["base"][0] if name != "base" and "base" in scores
                                          else None, beta) for name, s in scores.items()}
    else:
        results = {name: pair_metrics(*s, base=scores.get("base") if name != "base" else None, beta=beta)
                   for name, s in scores.items()}
    report = {"target": target, "objective": objective, "beta": beta, "rows": len(pairs), "results": results,
              "samples": sample_rows(pairs, scores)}
    keys = LABELLED_KEYS if labelled else KEYS
    return write_report(target, where, report, list(keys), log)


def _saved_objective(recipe_path: Path) -> tuple[str, float, int]:
    """(objective.name, objective.beta, data.max_length) of a saved or given recipe; DPO's and finetune's defaults
    without one."""
    import yaml

    try:
        saved = yaml.safe_load(recipe_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        saved = {}
    objective = saved.get("objective") or {}
    return (objective.get("name", "dpo"), float(objective.get("beta", 0.1)),
            int((saved.get("data") or {}).get("max_length", 2048)))
