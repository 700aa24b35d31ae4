"""Every override of a library internal is pinned: when transformers or TRL rename or reshape one, these fail
loudly instead of the override silently never running."""

import inspect

import pytest
from transformers import Trainer as HFTrainer

from finetune.trainer import OVERRIDDEN, Trainer

#: The parameters each overridden private method had when the override was written (transformers 5.23).
SIGNATURES = {
    "_clip_grad_norm": ["self", "model"],
    "_get_grad_norm": ["self", "model", "grad_norm"],
    "_prepare_for_training": ["self", "max_steps", "train_dataloader", "resume_from_checkpoint"],
    "_save_checkpoint": ["self", "model", "trial"],
}


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_each_overridden_internal_still_exists_with_the_same_parameters(name):
    assert name in SIGNATURES, f"{name} is overridden in finetune/trainer.py but not pinned here"
    library = getattr(HFTrainer, name, None)
    assert library is not None, f"transformers.Trainer.{name} is gone: finetune's override would never run"
    assert list(inspect.signature(library).parameters) == SIGNATURES[name]
    assert getattr(Trainer, name) is not library  # ours really replaces it


def test_trl_still_reads_its_lm_head_tile_width_from_the_module_global():
    import trl.trainer.utils as trl_utils

    assert isinstance(trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, int)
    source = inspect.getsource(trl_utils)
    assert source.count("_CHUNKED_LOGPROB_CHUNK_SIZE") >= 2  # defined and read at call time, not bound once
