"""ORPO (arXiv:2403.07691): SFT on the chosen answer plus an odds-ratio penalty on the rejected one, no reference.

loss = NLL(chosen) - beta x log sigmoid(log odds(chosen) - log odds(rejected)), where odds(y) = p / (1 - p) of the
answer's mean per-token probability p: one stage does what SFT then DPO do in two. Written here for the reason
finetune.objectives.simpo gives (TRL's ORPOTrainer is experimental and tokenises from text); the rest of the step is
TRL's DPOTrainer."""

from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import Field

from finetune.objectives import dpo
from finetune.objectives.base import PairedOptions


class Options(PairedOptions):
    """Supervised fine-tuning on the chosen answers with an odds-ratio preference term, in one stage."""

    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0)
    """Weight of the odds-ratio term against the SFT loss (the paper's lambda, TRL's beta); 0.1 is the paper's
    setting for its Llama-2 and Mistral runs (arXiv:2403.07691)."""

    def summary(self, method) -> str:
        return f"orpo (beta {self.beta}); no reference model"


def orpo_loss(chosen_sum, rejected_sum, chosen_len, rejected_len, beta: float):
    """(mean loss, chosen rewards, rejected rewards) of a batch from each answer's summed log-probability and length.
    The SFT term is the token-mean NLL over every chosen token of the batch, as a plain SFT step computes it."""
    import torch
    import torch.nn.functional as F

    chosen, rejected = chosen_sum / chosen_len, rejected_sum / rejected_len  # mean log-probabilities
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    nll = -chosen_sum.sum() / chosen_len.sum()
    return nll - beta * F.logsigmoid(log_odds).mean(), beta * chosen.detach(), beta * rejected.detach()


def trainer_args(options: Options, method, common: dict, max_length: int, packing: bool):
    return dpo.reference_free_args(common, options.beta)


def build_trainer(options: Options, **kwargs):
    return dpo.build_trainer(options, pair_loss=partial(orpo_loss, beta=options.beta), **kwargs)
