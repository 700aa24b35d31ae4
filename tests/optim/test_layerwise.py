"""The layer-wise optimizer engine and GaLore: equivalence, LR schedule, grad norm, memory, resume, refresh."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup
from typer.testing import CliRunner

from finetune.cli import app
from finetune.methods.galore import projected_weights
from finetune.optim.galore import Projector
from finetune.optim.layerwise import build_optimizer, new_stepper
from finetune.run.report import read_metrics

LR, DECAY = 1e-3, 0.01


def batches(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 400, (2, 12), generator=generator) for _ in range(n)]


def run(model, optimizer, accumulation, data, flag, on_step=None):
    """A plain accumulation loop; `flag["last"]` tells the engine which micro-batch ends the step."""
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, len(data) // accumulation)
    for step in range(len(data) // accumulation):
        expected_lr = scheduler.get_last_lr()[0]
        for k in range(accumulation):
            flag["last"] = k == accumulation - 1
            ids = data[step * accumulation + k]
            (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        if on_step:
            on_step(expected_lr)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def reference_adamw(model):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": DECAY}, {"params": rest, "weight_decay": 0.0}],
                             lr=LR)


def engine(model, layerwise, flag, bits=32, projector_for=lambda n, p: None):
    return build_optimizer(model, LR, DECAY, bits, layerwise, projector_for=projector_for,
                           is_last_micro_batch=lambda: flag["last"])


def assert_same_weights(a, b, atol=1e-6):
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("accumulation", [1, 4])
def test_layerwise_adamw_matches_torch_adamw_step_for_step(tiny_model_dir, accumulation):
    data = batches(3 * accumulation)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    run(reference, reference_adamw(reference), accumulation, data, {})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    flag = {}
    optimizer = engine(model, layerwise=True, flag=flag)
    used = []

    def check_lr(expected):
        # The per-parameter optimizers have already stepped inside backward, with these LRs.
        lrs = {group["lr"] for stepper in optimizer.steppers.values() for group in stepper.inner.param_groups}
        used.append((lrs, expected))

    run(model, optimizer, accumulation, data, flag, on_step=check_lr)
    assert all(lrs == {expected} for lrs, expected in used)
    assert [expected for _, expected in used] == pytest.approx([0.0, LR, LR / 2])  # warmup 1, cosine over 3
    assert_same_weights(model, reference)
    assert not torch.equal(model.lm_head.weight, AutoModelForCausalLM.from_pretrained(tiny_model_dir).lm_head.weight)


def test_layerwise_frees_each_gradient_as_it_steps(tiny_model_dir):
    counts = {}
    for layerwise in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        optimizer = engine(model, layerwise=layerwise, flag={"last": True})
        params = list(model.parameters())
        alive = []
        for p in params:  # registered after the engine's hooks, so they see the state right after each step
            p.register_post_accumulate_grad_hook(
                lambda _, alive=alive, params=params: alive.append(sum(q.grad is not None for q in params)))
        ids = batches(1)[0]
        model(input_ids=ids, labels=ids).loss.backward()
        counts[layerwise] = max(alive)
        optimizer.step()
    assert counts[True] == 0  # every gradient was gone as soon as its parameter stepped
    assert counts[False] == len(params)


@pytest.mark.parametrize("bits", [32, 8])
def test_galore_layerwise_equals_galore_with_accumulation_4(tiny_model_dir, bits):
    data = batches(16, seed=1)
    models = {}
    for layerwise in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        targets = projected_weights(model, ["attn", "mlp"])
        flag = {}

        def projector_for(name, param, targets=targets):
            return Projector(4, 2, 0.5, "std", "randomized", seed=len(name)) if name in targets else None

        optimizer = engine(model, layerwise, flag, bits=bits, projector_for=projector_for)
        run(model, optimizer, 4, data, flag)
        models[layerwise] = model
        assert all(optimizer.steppers[name].projector.refreshes == 2 for name in targets)  # steps 0 and 2
        assert all(optimizer.steppers[name].proxy.numel() == 0 for name in targets)  # no resident low-rank copy
    assert_same_weights(models[True], models[False], atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(models[True].model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_step_grad_norm_is_the_true_global_norm(tiny_model_dir):
    ids = batches(1, seed=2)[0]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference(input_ids=ids, labels=ids).loss.backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = engine(model, layerwise=True, flag={"last": True})
    model(input_ids=ids, labels=ids).loss.backward()
    assert optimizer.step_grad_norm() == pytest.approx(expected, rel=1e-5) and expected > 0


def test_per_parameter_clipping_caps_each_gradient_and_reports_the_norm_before(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    big, small = model.model.layers[0].mlp.up_proj.weight, model.model.layers[0].input_layernorm.weight
    steppers = {name: new_stepper(param, LR, DECAY, 32) for name, param in (("big", big), ("small", small))}
    big.grad = torch.full_like(big, 10.0 / big.numel() ** 0.5)  # norm 10
    small.grad = torch.full_like(small, 0.5 / small.numel() ** 0.5)  # norm 0.5
    small_grad = small.grad.clone()
    squared = {name: stepper.step(LR, max_grad_norm=1.0).item() for name, stepper in steppers.items()}
    assert squared == {"big": pytest.approx(100.0, rel=1e-5), "small": pytest.approx(0.25, rel=1e-5)}
    assert torch.linalg.vector_norm(big.grad).item() == pytest.approx(1.0, rel=1e-5)  # scaled down to the cap
    assert torch.equal(small.grad, small_grad)  # within the cap: untouched
    assert steppers["big"].step(LR, measure=False) is None  # non-layer-wise: the trainer measures, not us


def test_randomized_refresh_captures_the_exact_subspace_energy(tiny_model_dir):
    """On a real gradient, the randomized top-r subspace keeps >= 99% of the gradient energy the exact SVD's does."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = batches(1, seed=3)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    for grad in (model.model.layers[0].mlp.up_proj.weight.grad, model.model.layers[1].self_attn.q_proj.weight.grad):
        for rank in (4, 16):
            exact = Projector(rank, 200, 1.0, "std", "full", seed=0).get_orthogonal_matrix(grad, rank, "left")
            fast = Projector(rank, 200, 1.0, "std", "randomized", seed=0).get_orthogonal_matrix(grad, rank, "left")
            captured = (fast.T @ grad).pow(2).sum() / (exact.T @ grad).pow(2).sum()
            assert captured >= 0.99, (tuple(grad.shape), rank, captured.item())


runner = CliRunner()


@pytest.mark.slow  # a resumed run: seconds the edit loop's tier cannot spare
def test_resume_restores_every_optimizer_state_and_projector(write_recipe, tmp_path):
    method = {"name": "galore", "rank": 4, "update_proj_gap": 3, "scale": 1.0, "optim_bits": 8,
              "target_modules": "all-linear"}
    common = {"lr_scheduler": "constant", "warmup_ratio": 0.0, "gradient_accumulation_steps": 2, "batch_size": 2,
              "save_steps": 2}
    whole = write_recipe(name="whole.yaml", method=method,
                         train={**common, "max_steps": 5, "output_dir": str(tmp_path / "whole")})
    assert runner.invoke(app, ["train", str(whole)]).exit_code == 0
    parts = write_recipe(name="parts.yaml", method=method,
                         train={**common, "max_steps": 2, "output_dir": str(tmp_path / "parts")})
    assert runner.invoke(app, ["train", str(parts)]).exit_code == 0
    state = torch.load(tmp_path / "parts" / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "parts" / "model")
    assert state["steppers"].keys() == {n for n, _ in model.named_parameters()}
    projected = [s for s in state["steppers"].values() if "projector" in s]
    assert len(projected) == 14 and all(s["projector"]["ortho"] is not None for s in projected)
    result = runner.invoke(app, ["train", str(parts), "--resume", "--set", "train.max_steps=5"])
    assert result.exit_code == 0, result.output
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "parts" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)


def test_logged_grad_norm_and_lr_through_the_trainer(write_recipe, tmp_path):
    """Layer-wise runs log the same first-step grad norm as a normal run, and the scheduler's LR."""
    logged = {}
    for layerwise in (True, False):
        out = tmp_path / f"lw{layerwise}"
        recipe = write_recipe(name=f"{layerwise}.yaml", method={"name": "full", "layerwise": layerwise},
                              train={"max_steps": 3, "lr_scheduler": "linear", "warmup_ratio": 0.0,
                                     "output_dir": str(out), "max_grad_norm": 100.0})
        assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
        logged[layerwise] = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    first = logged[True][0]["grad_norm"]
    assert first > 0 and first == pytest.approx(logged[False][0]["grad_norm"], rel=1e-4)
    assert [r["lr"] for r in logged[True]] == pytest.approx([1e-3, 2e-3 / 3, 1e-3 / 3])
    assert [r["lr"] for r in logged[True]] == pytest.approx([r["lr"] for r in logged[False]])
    assert json.loads((tmp_path / "lwTrue" / "run.json").read_text())["method"] == "full"


def test_chunked_8bit_update_is_bit_identical_to_bitsandbytes():
    import bitsandbytes as bnb

    from finetune.optim.layerwise import CHUNK, _chunked_adamw8bit

    torch.manual_seed(0)
    start = torch.randn(CHUNK + 3 * 256 + 17)  # more than one chunk, ragged last block
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizers = [_chunked_adamw8bit()([ours], lr=1e-2, weight_decay=0.1),
                  bnb.optim.AdamW8bit([theirs], lr=1e-2, weight_decay=0.1)]
    for _ in range(3):
        grad = torch.randn_like(start)
        for param, optimizer in zip((ours, theirs), optimizers):
            param.grad = grad.clone()
            optimizer.step()
    assert torch.equal(ours, theirs) and not torch.equal(ours, start)
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(optimizers[0].state[ours][key], optimizers[1].state[theirs][key])
