"""LISA: only the sampled layers change, released optimizer state, deterministic resumable schedule."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
from typer.testing import CliRunner

from finetune.cli import app
from finetune.methods.lisa import LISA, decoder_layers
from finetune.recipe.load import load_recipe
from finetune.run.flow import Hooks, run_training
from finetune.run.report import read_metrics

runner = CliRunner()
OPTIONS = dict(activated_layers=2, interval_steps=3, train_embeddings=True, train_head=True, always_active=[],
               optim_bits=32, layerwise=False, seed=5)


def lisa_recipe(write_recipe, tiny4_model_dir, tmp_path, name="lisa", **method):
    return write_recipe(name=f"{name}.yaml", model={"name_or_path": str(tiny4_model_dir)},
                        method={"name": "lisa", "activated_layers": 2, "interval_steps": 3, "seed": 5, **method},
                        train={"lr_scheduler": "constant", "warmup_ratio": 0.0, "output_dir": str(tmp_path / name)})


def test_finds_the_decoder_stack_generically(tiny4_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny4_model_dir)
    name, layers = decoder_layers(model)
    assert name == "model.layers" and len(layers) == 4


def test_only_the_sampled_layers_embeddings_and_head_change_in_an_interval(write_recipe, tiny4_model_dir, tmp_path):
    path = lisa_recipe(write_recipe, tiny4_model_dir, tmp_path)
    recipe = load_recipe(path, ["train.max_steps=3"])  # exactly one interval
    run_training(recipe, path, log=lambda _: None)
    active = LISA(**OPTIONS)
    active.n_layers = 4
    expected_layers = active.layers_for(0)
    before = load_file(tiny4_model_dir / "model.safetensors")
    after = load_file(tmp_path / "lisa" / "model" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    changed_layers = {int(k.split(".")[2]) for k in changed if k.startswith("model.layers.")}
    assert changed_layers == set(expected_layers) and len(expected_layers) == 2
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= changed
    untouched = [k for k in before if k.startswith("model.layers.") and int(k.split(".")[2]) not in expected_layers]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)  # bit-equal


@pytest.mark.parametrize("bits", [32, 8])
def test_a_switch_releases_the_optimizer_state_of_inactive_layers(tiny4_model_dir, bits):
    model = AutoModelForCausalLM.from_pretrained(tiny4_model_dir)
    lisa = LISA(**{**OPTIONS, "optim_bits": bits, "activated_layers": 1})
    lisa.prepare(model, [])
    optimizer, _ = lisa.optimizers(model, 1e-3, 0.0, 0.0)
    footprints = []
    for interval in range(6):
        lisa._set_layers(lisa.layers_for(interval))
        ids = torch.randint(3, 400, (2, 10))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        layer_names = {n for n in optimizer.steppers if n.startswith("model.layers.")}
        assert {int(n.split(".")[2]) for n in layer_names} == set(lisa.active)
        tensors = [t for s in optimizer.steppers.values() for st in s.inner.state.values()
                   for t in st.values() if torch.is_tensor(t)]
        footprints.append((len(tensors), sum(t.numel() * t.element_size() for t in tensors)))
        inactive = [p for n, p in model.named_parameters()
                    if n.startswith("model.layers.") and int(n.split(".")[2]) not in lisa.active]
        assert all(not p.requires_grad and p.grad is None for p in inactive)
    assert len({layer for i in range(6) for layer in lisa.layers_for(i)}) > 1  # it really switched
    assert len(set(footprints)) == 1  # the same tensors and bytes whichever layer is active


def test_same_seed_same_schedule():
    a, b, c = LISA(**OPTIONS), LISA(**OPTIONS), LISA(**{**OPTIONS, "seed": 6})
    for lisa in (a, b, c):
        lisa.n_layers = 30
    schedule = [a.layers_for(i) for i in range(20)]
    assert schedule == [b.layers_for(i) for i in range(20)]
    assert schedule != [c.layers_for(i) for i in range(20)]
    assert all(len(set(layers)) == 2 for layers in schedule)


class RecordActive(TrainerCallback):
    def __init__(self, lisa_holder):
        self.holder, self.seen = lisa_holder, {}

    def _record(self, state):
        self.seen.setdefault(state.global_step, []).append(tuple(self.holder()))

    def on_substep_end(self, args, state, control, **kwargs):
        self._record(state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._record(state)


def test_switches_only_between_accumulation_windows(write_recipe, tiny4_model_dir, tmp_path):
    path = lisa_recipe(write_recipe, tiny4_model_dir, tmp_path, name="accum", interval_steps=1)
    recipe = load_recipe(path, ["train.max_steps=6", "train.batch_size=1", "train.gradient_accumulation_steps=4"])
    holder = {}

    def watch(trainer, method):
        holder["cb"] = RecordActive(lambda: method.active)
        trainer.add_callback(holder["cb"])

    run_training(recipe, path, log=lambda _: None, hooks=Hooks(on_trainer=watch))
    seen = holder["cb"].seen
    assert len(seen) == 6 and all(len(records) == 4 for records in seen.values())  # 3 substeps + the last
    assert all(len(set(records)) == 1 for records in seen.values())  # one layer set per optimizer step
    assert len({records[0] for records in seen.values()}) > 1  # and it did switch between steps
    logged = [r["active_layers"] for r in read_metrics(tmp_path / "accum" / "metrics.jsonl") if "active_layers" in r]
    assert logged and all(len(layers) == 2 for layers in logged)


def test_resume_trains_the_same_layers_to_the_same_weights(write_recipe, tiny4_model_dir, tmp_path):
    for name, steps in (("whole", 8), ("parts", 4)):
        path = lisa_recipe(write_recipe, tiny4_model_dir, tmp_path, name=name, optim_bits=8, layerwise=True)
        result = runner.invoke(app, ["train", str(path), "--set", f"train.max_steps={steps}",
                                     "--set", "train.save_steps=4"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", str(tmp_path / "parts.yaml"), "--resume", "--set", "train.max_steps=8",
                                 "--set", "train.save_steps=4"])
    assert result.exit_code == 0, result.output
    schedule = {name: [(r["step"], r["active_layers"]) for r in read_metrics(tmp_path / name / "metrics.jsonl")
                       if "active_layers" in r] for name in ("whole", "parts")}
    assert [s for s in schedule["parts"] if s[0] > 4] == [s for s in schedule["whole"] if s[0] > 4]
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "parts" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)


def test_bad_layer_indices_are_a_clear_error(write_recipe, tiny4_model_dir, tmp_path):
    path = lisa_recipe(write_recipe, tiny4_model_dir, tmp_path, always_active=[7])
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2 and "the model has 4 decoder layers (indices 0..3)" in result.output


def test_a_tied_head_cannot_train_apart_from_the_embeddings(tiny4_model_dir):
    from finetune.errors import UserError

    untied = AutoModelForCausalLM.from_pretrained(tiny4_model_dir)
    LISA(**{**OPTIONS, "train_embeddings": False}).prepare(untied, [])
    assert untied.lm_head.weight.requires_grad and not untied.model.embed_tokens.weight.requires_grad
    config = AutoConfig.from_pretrained(tiny4_model_dir)
    config.tie_word_embeddings = True  # as SmolLM2 does
    tied = AutoModelForCausalLM.from_config(config)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(UserError, match="ties its head to its input embeddings"):
        LISA(**{**OPTIONS, "train_embeddings": False}).prepare(tied, [])


def test_frozen_embeddings_stop_backward_at_the_lowest_active_layer(write_recipe, tiny4_model_dir, tmp_path,
                                                                    monkeypatch):
    """With checkpointing, a layer runs forward again only if backward passes through it: layers below the
    lowest active one must run once per micro-batch (nothing below needs a gradient), the active ones twice."""
    monkeypatch.setattr(LISA, "layers_for", lambda self, interval: [2, 3])
    path = lisa_recipe(write_recipe, tiny4_model_dir, tmp_path, name="shallow", train_embeddings=False,
                       train_head=False)
    recipe = load_recipe(path, ["train.max_steps=2", "model.gradient_checkpointing=true"])
    calls = {index: 0 for index in range(4)}

    def count_forwards(trainer, method):
        for index, layer in enumerate(decoder_layers(trainer.model)[1]):
            # a wrapped forward, not a forward hook: checkpointing's recompute runs no module hooks
            def counted(*args, forward=layer.mlp.forward, index=index, **kwargs):
                calls[index] += 1
                return forward(*args, **kwargs)

            layer.mlp.forward = counted

    run_training(recipe, path, log=lambda _: None, hooks=Hooks(on_trainer=count_forwards))
    assert calls[0] == calls[1] == 2 and calls[2] == calls[3] == 4  # 2 steps: once, or forward + recompute
    before = load_file(tiny4_model_dir / "model.safetensors")
    after = load_file(tmp_path / "shallow" / "model" / "model.safetensors")
    assert not torch.equal(before["model.layers.2.mlp.up_proj.weight"], after["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
