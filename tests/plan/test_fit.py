"""`--fit BUDGET`: the choice on the tiny model for budgets that force each knob, the effective batch kept, `--allow`
honoured, the error for an impossible budget, the cost model's arithmetic, and `--apply`/`train --fit` end to end."""

import dataclasses
import json

import pytest
import yaml
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import UserError
from finetune.models.registry import load_config
from finetune.plan import choose
from finetune.plan.fit import DEFAULT_KNOBS, FIT_MARGIN, KNOB_KEYS, KNOBS, fit_recipe
from finetune.plan.rows import RowLengths
from finetune.plan.speed import Throughput, step_seconds, training_flops
from finetune.recipe.load import load_recipe

runner = CliRunner()
#: A device of 100 GFLOP/s whose micro-batches cost 1 ms a decoder layer besides their FLOPs.
DEVICE = Throughput("cpu", 100e9, 20e9, source="assumed", head_flops=100e9, layer_overhead=1e-3)


def fitted(recipe_path, budget, allowed=DEFAULT_KNOBS, rows=None):
    recipe = load_recipe(recipe_path)
    rows = rows or RowLengths(recipe.data.max_length, (recipe.data.max_length,) * 32)
    return fit_recipe(recipe, budget, allowed, device="cpu", throughput=DEVICE, rows=rows, overhead=0.0)


def peaks(recipe_path, allowed, rows=None) -> dict[str, float]:
    """Every candidate's predicted peak, from a budget nothing exceeds."""
    return {c.label(): c.peak for c in fitted(recipe_path, 1e15, allowed, rows).candidates if c.refused is None}


def between(low: float, high: float) -> float:
    """A budget whose usable part lies between two peaks."""
    return (low + high) / 2 / (1 - FIT_MARGIN)


def test_a_generous_budget_keeps_the_recipe_and_says_why_the_others_lost(write_recipe):
    fit = fitted(write_recipe(), 1e15)
    assert fit.chosen.changes == {}  # batch 4 without checkpointing is already the fastest
    assert all(c.verdict.startswith("fits, slower") for c in fit.candidates[1:])


@pytest.mark.parametrize("knob, recipe", [
    ("batch", {}),
    ("checkpointing", {}),
    ("8bit", {}),
    ("layerwise", {"train": {"batch_size": 1}, "data": {"max_length": 16}}),  # gradients outweigh activations
    ("method", {}),
    ("seq", {"data": {"max_length": 256}}),
    ("loss", {"data": {"max_length": 2048}, "train": {"batch_size": 8}}),  # whole logits outgrow a capped tile
])
def test_a_budget_below_the_recipe_forces_each_knob(write_recipe, knob, recipe):
    path = write_recipe(**recipe)
    allowed = (knob,)
    need = peaks(path, allowed)
    as_written = need.pop("the recipe as written")
    smallest = min(need.values())
    assert smallest < as_written
    fit = fitted(path, between(smallest, as_written), allowed)
    assert fit.chosen.changes and fit.chosen.knobs == {knob}
    assert fit.chosen.peak <= fit.usable < as_written
    assert "does not fit" in next(c.verdict for c in fit.candidates if c.label() == "the recipe as written")
    if knob == "seq":  # the data change is stated: these rows are all longer than the cut
        assert fit.chosen.recipe.data.max_length < 256


def test_the_batch_knob_keeps_the_effective_batch(write_recipe):
    path = write_recipe(train={"batch_size": 4, "gradient_accumulation_steps": 2})
    need = peaks(path, ("batch",))
    fit = fitted(path, between(min(need.values()), need["the recipe as written"]), ("batch",))
    for candidate in fit.candidates:
        t = candidate.recipe.train
        assert t.batch_size * t.gradient_accumulation_steps == 8
    assert fit.chosen.recipe.train.batch_size < 4


@pytest.mark.parametrize("allowed", [("batch",), ("checkpointing",), DEFAULT_KNOBS, ("batch", "method"),
                                     tuple(KNOBS)])
@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 16, "dropout": 0.0}])
def test_a_knob_not_allowed_is_never_turned(write_recipe, allowed, method):
    fit = fitted(write_recipe(method=method), 1e15, allowed)
    assert len(fit.candidates) > 1
    known = {key for keys in KNOB_KEYS.values() for key in keys}
    for candidate in fit.candidates:
        assert candidate.knobs <= set(allowed), candidate.label()
        # nothing else changes: a method switch keeps its alternatives' own settings, not the recipe's dropout
        assert set(candidate.changes) <= known, candidate.label()


def test_packing_is_chosen_for_speed_when_rows_vary(write_recipe):
    path = write_recipe()
    short = RowLengths(64, tuple([8] * 28 + [64] * 4))  # mostly short rows: a padded batch is mostly padding
    plain = fitted(path, 1e15, DEFAULT_KNOBS, short)
    packed = fitted(path, 1e15, (*DEFAULT_KNOBS, "packing"), short)
    assert "train.packing" not in plain.chosen.changes
    assert packed.chosen.changes.get("train.packing") is True
    assert packed.chosen.tokens_per_second > plain.chosen.tokens_per_second


def test_an_impossible_budget_names_the_smallest_need_and_the_closest_knob(write_recipe):
    path = write_recipe()
    smallest = min(peaks(path, DEFAULT_KNOBS).values())
    with pytest.raises(UserError) as err:
        fitted(path, smallest / 2)
    message = str(err.value)
    assert f"{smallest / 2**30:.2f} GiB" in message and "closest" in message
    assert "--allow" in message  # switching the method reaches less than the default knobs can


def test_the_cost_model_counts_six_flops_per_weight_and_the_recompute():
    config = load_config("llama2-7b")
    layer_weights = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    head_weights = 4096 * 32000
    plain = sum(training_flops(config, 1, layer_weights, head_weights, checkpointing=False, head_in_tiles=False))
    assert plain == pytest.approx(6 * (layer_weights + head_weights), rel=0.001)  # Kaplan et al.: 6N per token
    recomputed = training_flops(config, 1, layer_weights, head_weights, checkpointing=True, head_in_tiles=True)
    assert recomputed[0] == pytest.approx(8 * layer_weights, rel=0.001)  # one more forward of the layers
    assert recomputed[1] == pytest.approx(8 * head_weights)  # and of the head, tile by tile
    args = dict(context=256, layer_trained=layer_weights, head_trained=head_weights, optimizer_weights=0,
                optim_bits=32, weight_bytes=2, checkpointing=False)
    fixed = 32 * DEVICE.layer_overhead  # a micro-batch's fixed cost: 32 layers
    big = step_seconds(config, DEVICE, micro_tokens=1024, accumulation=1, **args)
    assert big == pytest.approx(fixed + 1024 * plain / 100e9, rel=0.01)
    small = step_seconds(config, DEVICE, micro_tokens=256, accumulation=4, **args)
    assert small - big == pytest.approx(3 * fixed)  # the same FLOPs, three more micro-batches' fixed cost
    update = step_seconds(config, DEVICE, micro_tokens=1024, accumulation=1, **{**args, "optimizer_weights": 7e9})
    assert update - big == pytest.approx(7e9 * (3 * 2 + 4 * 2) / DEVICE.bandwidth)  # AdamW's traffic
    lora = step_seconds(config, DEVICE, micro_tokens=1024, accumulation=1, **{**args, "layer_trained": 0.0})
    assert (lora - fixed) / (big - fixed) == pytest.approx((4 * layer_weights + 6 * head_weights) / plain, rel=0.01)
    recompute = step_seconds(config, DEVICE, micro_tokens=1024, accumulation=1, **{**args, "checkpointing": True})
    assert recompute - big == pytest.approx(fixed + 1024 * 2 * layer_weights / 100e9, rel=0.01)
    adapters = dataclasses.replace(DEVICE, adapter_overhead=2e-4, adapter_token_seconds=1e-6)
    adapted = step_seconds(config, adapters, micro_tokens=1024, accumulation=2, adapted_layers=224, **args)
    assert adapted - 2 * big == pytest.approx(2 * 224 * (2e-4 + 1024 * 1e-6))  # each adapter, each micro-batch


def test_a_probe_over_the_budget_steps_to_the_next_candidate(write_recipe, monkeypatch):
    path = write_recipe()
    fit = fitted(path, 1e15)
    first, second = fit.candidates[0], fit.candidates[1]
    measured = iter([{"peak_bytes": 2e15, "tokens_per_second": 1.0}, {"peak_bytes": 1.0, "tokens_per_second": 1.0}])
    monkeypatch.setattr("finetune.plan.probe.probe", lambda *a, **k: next(measured))
    choose.settle_by_probe(fit, path, [], 2, log=lambda *a: None)
    assert fit.chosen is second and fit.candidates[0] is second
    assert "probe:" in first.verdict and "budget" in first.verdict
    monkeypatch.setattr("finetune.plan.probe.probe", lambda *a, **k: {"peak_bytes": 2e15, "tokens_per_second": 1.0})
    with pytest.raises(UserError, match="exceeded it when run"):
        choose.settle_by_probe(fitted(path, 1e15), path, [], 2, log=lambda *a: None)


def test_fit_options_need_fit_and_a_valid_budget(write_recipe):
    path = str(write_recipe())
    for args, expected in ((["plan", path, "--allow", "method"], "go with --fit"),
                           (["plan", path, "--fit", "lots"], "--fit 'lots'"),
                           (["plan", path, "--fit", "1GiB", "--allow", "wings"], "unknown knob")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output, result.output


#: A recipe slower than it need be: a generous budget then changes it whatever this process's libraries weigh.
SLOW_SETTINGS = {"batch_size": 1, "gradient_accumulation_steps": 4}


@pytest.mark.slow
def test_apply_writes_a_recipe_that_validates_and_trains(write_recipe, tmp_path):
    path = write_recipe(model={"gradient_checkpointing": True},
                        train={"max_steps": 2, **SLOW_SETTINGS, "output_dir": str(tmp_path / "applied-run")})
    out = tmp_path / "fitted.yaml"
    result = runner.invoke(app, ["plan", str(path), "--fit", "64GiB", "--apply", str(out)])
    assert result.exit_code == 0, result.output
    applied = load_recipe(out)
    assert (applied.train.batch_size, applied.model.gradient_checkpointing) == (4, False)
    assert applied.train.batch_size * applied.train.gradient_accumulation_steps == 4
    assert out.read_text().count("# finetune plan --fit:") == 3
    again = runner.invoke(app, ["plan", str(path), "--fit", "64GiB", "--apply", str(out)])
    assert again.exit_code == 2 and "exists" in again.output  # never overwritten
    trained = runner.invoke(app, ["train", str(out)])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "applied-run" / "model" / "config.json").is_file()


@pytest.mark.slow
def test_train_fit_records_the_choice_in_run_json_and_the_recipe(write_recipe, tmp_path):
    path = write_recipe(train={"max_steps": 2, **SLOW_SETTINGS, "output_dir": str(tmp_path / "fit-run")})
    result = runner.invoke(app, ["train", str(path), "--fit", "64GiB", "--probe", "2"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "fit-run" / "run.json").read_text())
    chosen = info["fit"]["chosen"]
    assert chosen["changes"] and 0 < chosen["probe"]["peak_bytes"] < 64 * 2**30
    assert 0 < info["fit"]["measured_peak_gib"] < 64 and "within the --fit budget" in result.output
    resolved = yaml.safe_load((tmp_path / "fit-run" / "recipe.yaml").read_text())
    for key, value in chosen["changes"].items():
        section, field = key.split(".", 1)
        assert resolved[section][field] == value
    assert resolved["train"]["batch_size"] == 4


def test_rows_padding_and_cuts():
    rows = RowLengths(64, (10, 20, 30, 64))
    assert rows.longest(32) == 32 and rows.longest(128) == 64
    assert rows.rows_cut(25) == 2
    assert 10 < rows.padded(1, 64) < rows.padded(4, 64) <= 64
