"""Every override of a library internal is pinned: when transformers or TRL rename or reshape one, these fail
loudly instead of the override silently never running."""

import inspect

import pytest
from transformers import Trainer as HFTrainer
from trl import DPOTrainer, GRPOTrainer, KTOTrainer

from finetune.run.rl import OVERRIDDEN_GRPO, RewardTrainer
from finetune.run.trainer import (
    OVERRIDDEN,
    OVERRIDDEN_DPO,
    OVERRIDDEN_KTO,
    TOKEN_METRIC_OUTPUTS,
    PreferenceTrainer,
    Trainer,
    UnpairedPreferenceTrainer,
)

#: The parameters each overridden private method had when the override was written (transformers 5.23).
SIGNATURES = {
    "_clip_grad_norm": ["self", "model"],
    "_get_grad_norm": ["self", "model", "grad_norm"],
    "_prepare_for_training": ["self", "max_steps", "train_dataloader", "resume_from_checkpoint"],
    "_save_checkpoint": ["self", "model", "trial"],
}


#: TRL 1.16's DPOTrainer (and KTOTrainer) internals finetune's preference trainers override, with their parameters.
DPO_SIGNATURES = {"_prepare_dataset": ["self", "dataset", "processing_class", "args", "dataset_name"],
                  "_precompute_ref_logps": ["self", "dataset", "name", "batch_size"],
                  "_compute_loss": ["self", "model", "inputs", "return_outputs"]}
#: TRL 1.16's GRPOTrainer methods finetune's RewardTrainer overrides, with their parameters.
GRPO_SIGNATURES = {"_tokenize_prompts": ["self", "prompts"],
                   "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                                             "has_tool_images"],
                   "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
                   "training_step": ["self", "model", "inputs", "num_items_in_batch"],
                   "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
                   "log": ["self", "logs", "start_time"]}


@pytest.mark.parametrize("library_class,ours,name,signatures", [
    *[(HFTrainer, Trainer, name, SIGNATURES) for name in OVERRIDDEN],
    *[(HFTrainer, PreferenceTrainer, name, SIGNATURES) for name in OVERRIDDEN],
    *[(DPOTrainer, PreferenceTrainer, name, DPO_SIGNATURES) for name in OVERRIDDEN_DPO],
    *[(HFTrainer, UnpairedPreferenceTrainer, name, SIGNATURES) for name in OVERRIDDEN],
    *[(KTOTrainer, UnpairedPreferenceTrainer, name, DPO_SIGNATURES) for name in OVERRIDDEN_KTO],
    *[(HFTrainer, RewardTrainer, name, SIGNATURES) for name in OVERRIDDEN],
    *[(GRPOTrainer, RewardTrainer, name, GRPO_SIGNATURES) for name in OVERRIDDEN_GRPO],
], ids=lambda value: value if isinstance(value, str) else value.__name__ if isinstance(value, type) else "")
def test_each_overridden_internal_still_exists_with_the_same_parameters(library_class, ours, name, signatures):
    assert name in signatures, f"{name} is overridden in finetune/trainer.py but not pinned here"
    library = getattr(library_class, name, None)
    assert library is not None, f"{library_class.__name__}.{name} is gone: finetune's override would never run"
    assert list(inspect.signature(library).parameters) == signatures[name]
    assert getattr(ours, name) is not library  # ours really replaces it


def test_trl_still_asks_its_fused_head_for_the_token_metrics_finetune_leaves_out():
    """finetune.run.trainer.lean_lm_head patches the head again with log-probs alone, and its compute_loss takes over
    only where TRL's would compute just what it drops: both follow what SFTTrainer asks the head for."""
    from trl import SFTTrainer

    asked = "outputs=(" + ", ".join(f'"{name}"' for name in TOKEN_METRIC_OUTPUTS) + ")"
    assert asked in inspect.getsource(SFTTrainer.__init__)
    assert list(inspect.signature(SFTTrainer.compute_loss).parameters) == [
        "self", "model", "inputs", "return_outputs", "num_items_in_batch"]


def test_the_checkpoint_loader_finetune_calls_is_unchanged():
    """finetune.run.flow finishes a run whose last checkpoint is its final step through
    Trainer._load_from_checkpoint."""
    assert list(inspect.signature(HFTrainer._load_from_checkpoint).parameters) == [
        "self", "resume_from_checkpoint", "model"]


def test_bitsandbytes_8bit_update_internals_the_cpu_chunking_calls_are_unchanged():
    """finetune.optim.layerwise replaces AdamW8bit.update_step on CPU and calls bitsandbytes' blockwise kernel with
    positional arguments: a reordered or renamed parameter would silently compute a different update."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    assert list(inspect.signature(bnb.optim.AdamW8bit.update_step).parameters) == [
        "self", "group", "p", "gindex", "pindex"]
    assert list(inspect.signature(bnb.optim.AdamW8bit.get_config).parameters) == ["self", "gindex", "pindex", "group"]
    assert list(inspect.signature(F.optimizer_update_8bit_blockwise).parameters) == [
        "optimizer_name", "g", "p", "state1", "state2", "beta1", "beta2", "beta3", "alpha", "eps", "step", "lr",
        "qmap1", "qmap2", "absmax1", "absmax2", "weight_decay", "gnorm_scale", "skip_zeros"]


def test_galore_projector_still_refreshes_through_get_orthogonal_matrix():
    """finetune.optim.galore.Projector overrides get_orthogonal_matrix (randomized SVD); galore-torch must still
    call it, with these arguments, for every projection side."""
    from galore_torch.galore_projector import GaLoreProjector

    assert list(inspect.signature(GaLoreProjector.get_orthogonal_matrix).parameters) == [
        "self", "weights", "rank", "type"]
    source = inspect.getsource(GaLoreProjector.project)
    for side in ("right", "left", "full"):
        assert f"self.get_orthogonal_matrix(full_rank_grad, self.rank, type='{side}')" in source


def test_the_loss_in_tiles_is_the_whole_logits_loss(write_recipe, tmp_path):
    """train.chunked_loss (TRL's fused LM head, which `finetune plan --fit` may turn on) changes memory, not maths:
    the same batch gives the same loss and the same gradients either way."""
    import torch

    from tests.helpers.runs import built_trainer

    results = {}
    for chunked in (False, True):
        def measure(trainer, chunked=chunked):
            batch = next(iter(trainer.get_train_dataloader()))
            model, paths = trainer.model, []
            forward = model.forward  # TRL's patched forward: record which loss path each call takes
            model.forward = lambda *a, **k: paths.append(k.get("fused_lm_head", False)) or forward(*a, **k)
            model.zero_grad()
            loss = trainer.compute_loss(model, dict(batch))
            loss.backward()
            assert paths == [chunked]
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[chunked] = (loss.detach(), grads)

        recipe = write_recipe(name=f"chunked-{chunked}.yaml",
                              train={"chunked_loss": chunked, "output_dir": str(tmp_path / f"run-{chunked}")})
        built_trainer(recipe, measure)
    (whole, whole_grads), (tiled, tiled_grads) = results[False], results[True]
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)
    assert whole_grads.keys() == tiled_grads.keys() and whole_grads
    for name in whole_grads:
        torch.testing.assert_close(tiled_grads[name], whole_grads[name], rtol=1e-4, atol=1e-6)
