"""SimPO (arXiv:2405.14734): preference tuning without a reference model, on length-normalised log-probabilities.

The implicit reward of an answer is beta x its mean per-token log-probability, and the chosen answer's must beat the
rejected one's by a margin gamma: loss = -log sigmoid(beta x (mean logp chosen - mean logp rejected) - gamma). No
reference forward, no precomputed pass: every method trains it as it trains SFT. The loss is written here (ten
lines) rather than taken from TRL's CPOTrainer, an experimental trainer that tokenises rows itself from text and
so could not take finetune's prepared pairs; the rest of the step is TRL's DPOTrainer (finetune.run.trainer)."""

from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import Field

from finetune.objectives import dpo
from finetune.objectives.base import PairedOptions


class Options(PairedOptions):
    """Reference-free preference tuning: the chosen answer's mean log-probability must beat the rejected one's."""

    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0)
    """Scale of the length-normalised reward. The SimPO paper tunes it in 2.0-2.5 (arXiv:2405.14734, its setups
    table); far larger than DPO's, since a mean log-probability moves far less than a summed log-ratio."""
    gamma: float = Field(1.0, ge=0)
    """The target reward margin between chosen and rejected; the paper keeps gamma / beta around 0.5."""

    def summary(self, method) -> str:
        return f"simpo (beta {self.beta}, gamma {self.gamma}); no reference model"


def simpo_loss(chosen_sum, rejected_sum, chosen_len, rejected_len, beta: float, gamma: float):
    """(mean loss, chosen rewards, rejected rewards) of a batch from each answer's summed log-probability and length."""
    import torch.nn.functional as F

    chosen, rejected = beta * chosen_sum / chosen_len, beta * rejected_sum / rejected_len
    return -F.logsigmoid(chosen - rejected - gamma).mean(), chosen.detach(), rejected.detach()


def trainer_args(options: Options, method, common: dict, max_length: int, packing: bool):
    return dpo.reference_free_args(common, options.beta)


def build_trainer(options: Options, **kwargs):
    return dpo.build_trainer(options, pair_loss=partial(simpo_loss, beta=options.beta, gamma=options.gamma), **kwargs)
