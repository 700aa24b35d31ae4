"""The loss the production trainer computes, on the tiny model.

- finetune's lean loss paths (no per-step token metrics: the model's own loss on a CPU, TRL's fused head with
  log-probabilities alone on CUDA) give TRL's loss and gradient; `train.token_metrics` brings TRL's metrics back.
- Padding-free packing (`train.packing`): the same rows give the same loss and gradient packed as padded; the same
  pack under a plain causal mask (rows attending across their boundaries) does not, so the check can fail."""

import pytest
import torch

from finetune.recipe.load import load_recipe
from finetune.run.flow import Hooks, run_training


class _Built(Exception):
    """Stops run_training once its trainer exists: these tests need the trainer, not a run."""


def production_trainer(write_recipe, tmp_path, model=None, **train):
    """The trainer `finetune train` builds for the tiny model's recipe with these `train` values."""
    n = len(list(tmp_path.iterdir()))
    recipe_path = write_recipe(name=f"r{n}.yaml", data={"max_length": 128}, model=model or {},
                               train={"output_dir": str(tmp_path / f"run{n}"), **train})
    built = {}

    def grab(trainer, method):
        built["trainer"] = trainer
        raise _Built

    with pytest.raises(_Built):
        run_training(load_recipe(recipe_path), recipe_path, log=lambda *a, **k: None, hooks=Hooks(on_trainer=grab))
    return built["trainer"]


def loss_and_gradient(trainer, batch):
    model = trainer.model.train()  # as the trainer sets it for its steps
    model.zero_grad(set_to_none=True)
    tokens = (batch["labels"][:, 1:] != -100).sum()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=tokens)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grad, int(tokens)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_loss_and_gradient_of_the_same_rows_padded(write_recipe, tmp_path, attention):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finetune.run.trainer import PackedRows

    model = {"attn_implementation": attention}
    # 32 rows of 15-20 tokens: one batch holds them all, padded (32 rows) or packed (a few 128-token packs)
    padded = production_trainer(write_recipe, tmp_path, model, packing=False, batch_size=32)
    packed = production_trainer(write_recipe, tmp_path, model, packing=True, batch_size=32)
    assert padded.model.config._attn_implementation == packed.model.config._attn_implementation == attention
    assert isinstance(packed.data_collator, PackedRows)
    padded_batch = next(iter(padded.get_train_dataloader()))
    packed_batch = next(iter(packed.get_train_dataloader()))
    rows, real = padded_batch["input_ids"].shape[0], int(padded_batch["attention_mask"].sum())
    assert rows == 32 and real < padded_batch["input_ids"].numel()  # padding
    packs = len(packed.train_dataset)
    assert packs < 32  # several rows per pack
    # one row per pack, no attention mask, positions restarting at each of the 32 rows (and at every pad token)
    assert packed_batch["input_ids"].shape[0] == packs and "attention_mask" not in packed_batch
    pad = packed_batch["input_ids"] == packed.processing_class.pad_token_id
    assert int(((packed_batch["position_ids"] == 0) & ~pad).sum()) == 32 and int((~pad).sum()) == real

    loss, grad, tokens = loss_and_gradient(padded, padded_batch)
    packed_loss, packed_grad, packed_tokens = loss_and_gradient(packed, packed_batch)
    assert packed_tokens == tokens
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_grad, grad, rtol=1e-4, atol=1e-6)

    # TRL's padding-free collation, which flash-attention's varlen kernels take: the packs as one flat sequence
    packs_as_examples = [packed.train_dataset[i] for i in range(packs)]
    flat = DataCollatorForLanguageModeling(pad_token_id=packed.processing_class.pad_token_id, padding_free=True)(
        packs_as_examples)
    assert flat["input_ids"].shape == (1, real)
    flat_loss, flat_grad, _ = loss_and_gradient(packed, flat)
    torch.testing.assert_close(flat_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat_grad, grad, rtol=1e-4, atol=1e-6)

    # the control: the same packs under a plain causal mask, each row attending to the rows before it in its pack
    leaky = dict(packed_batch, attention_mask=(~pad).long())
    leaky_loss, _, _ = loss_and_gradient(packed, leaky)
    assert abs(leaky_loss - loss) / loss > 10 * 1e-5  # ten times the tolerance the packed loss met


def test_the_lean_loss_paths_give_trls_loss_and_gradient(write_recipe, tmp_path, monkeypatch):
    import finetune.run.trainer as trainer_module

    lean = production_trainer(write_recipe, tmp_path, batch_size=8)
    trl = production_trainer(write_recipe, tmp_path, batch_size=8, token_metrics=True)
    batch = next(iter(trl.get_train_dataloader()))
    expected, expected_grad, _ = loss_and_gradient(trl, batch)
    assert {"entropy", "mean_token_accuracy"} <= trl._metrics["train"].keys()  # TRL's path, metrics and all
    loss, grad, _ = loss_and_gradient(lean, batch)  # on a CPU: the model's own loss over the full logits
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(trainer_module, "FUSED_HEAD_DEVICES", ("cpu",))  # the CUDA path: fused head, log-probs only
    loss, grad, _ = loss_and_gradient(lean, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert not lean._metrics["train"]  # nothing computed for metrics, nothing read back
    out = lean.model(**{k: v for k, v in batch.items()}, fused_lm_head=True)
    assert out.entropy is None and out.is_top1 is None  # the head was patched again with log-probs alone
