"""Training through the CLI on the tiny model: full and LoRA runs, run-dir contents, accumulation, resume."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app
from finetune.recipe.load import load_recipe
from finetune.run.flow import run_training
from finetune.run.report import read_metrics

runner = CliRunner()


def train(*args):
    result = runner.invoke(app, ["train", *map(str, args)])
    return result


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_full_run_lowers_loss_and_writes_a_complete_run_dir(write_recipe, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(data={"eval_fraction": 0.125}, train={"max_steps": 12, "eval_steps": 6})
    result = train(recipe)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert "trainable / total params" in result.output and "effective batch" in result.output
    for name in ("recipe.yaml", "run.json", "metrics.jsonl", "loss.png", "held_out.jsonl", "model/config.json"):
        assert (run / name).exists(), name
    curve = losses(run)
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < curve[0] - 0.3
    records = read_metrics(run / "metrics.jsonl")
    step = next(r for r in records if "loss" in r)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gb"} <= step.keys()
    assert step["grad_norm"] > 0 and step["tokens_per_s"] > 0
    assert "mean_token_accuracy" not in step and "entropy" not in step  # train.token_metrics is off by default
    # where the time to the first step went, in the log and in run.json
    startup = json.loads((run / "run.json").read_text())["startup_seconds"]
    assert list(startup) == ["start", "imports", "data", "model", "trainer", "loop start", "step 1"]
    assert all(seconds >= 0 for seconds in startup.values()) and startup["step 1"] > 0
    assert "start-up so far" in result.output and "first optimizer step done" in result.output
    # evaluated at steps 6 and 12, the last step once (transformers evaluates it; the flow does not again)
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12]
    assert len((run / "held_out.jsonl").read_text().splitlines()) == 4
    # The final weights are a plain transformers checkpoint with our ChatML tokenizer.
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(run / "model").chat_template
    assert json.loads((run / "run.json").read_text())["base_weights_sha256"]


def test_lora_trains_only_adapter_params_and_loads_with_peft(write_recipe, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # checkpointing on: with no grad-requiring embedding output, the first layer's adapters must still train
    # token_metrics: TRL's own loss path, with its per-step metrics in metrics.jsonl
    recipe = write_recipe(method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                          model={"gradient_checkpointing": True},
                          train={"learning_rate": 5e-3, "max_steps": 10, "token_metrics": True})
    result = train(recipe)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert losses(run)[-1] < losses(run)[0]
    steps = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert all(0 <= r["mean_token_accuracy"] <= 1 and r["entropy"] > 0 for r in steps)
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert all(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)  # B starts at 0
    # every linear layer but the head got an adapter (all-linear)
    targets = {name.split(".")[-3] for name in adapter}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = PeftModel.from_pretrained(base, run / "adapter")
    merged = tuned.merge_and_unload()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base_state[k])}
    assert changed and all(any(t in k for t in targets) for k in changed)
    assert not any("embed" in k or "norm" in k or "lm_head" in k for k in changed)


def test_accumulation_matches_the_large_batch(write_recipe, tmp_path):
    """1 row x 4 accumulation steps == 4 rows x 1 step: same gradient norm, same weights after the update."""
    results = {}
    for name, batch, accumulation in (("big", 4, 1), ("accum", 1, 4)):
        path = write_recipe(name=f"{name}.yaml", train={
            "max_steps": 1, "batch_size": batch, "gradient_accumulation_steps": accumulation,
            "output_dir": str(tmp_path / name)})
        run_training(load_recipe(path), path, log=lambda _: None)
        results[name] = (read_metrics(tmp_path / name / "metrics.jsonl")[0]["grad_norm"],
                         load_file(tmp_path / name / "model" / "model.safetensors"))
    (norm_big, weights_big), (norm_acc, weights_acc) = results["big"], results["accum"]
    assert norm_big == pytest.approx(norm_acc, rel=1e-4)
    for key, value in weights_big.items():
        torch.testing.assert_close(value, weights_acc[key], rtol=1e-5, atol=1e-6)


def test_run_dir_is_never_clobbered_and_resume_continues(write_recipe, tmp_path):
    recipe = write_recipe(train={"max_steps": 2, "save_steps": 2})
    assert train(recipe).exit_code == 0
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_text()

    refused = train(recipe)
    assert refused.exit_code == 2
    assert "is not empty; pass --overwrite" in refused.output
    assert (run / "metrics.jsonl").read_text() == before  # nothing lost

    resumed = train(recipe, "--resume", "--set", "train.max_steps=4")
    assert resumed.exit_code == 0, resumed.output
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert (run / "checkpoints" / "checkpoint-4").is_dir()
    assert json.loads((run / "run.json").read_text())["steps"] == 4

    assert train(recipe, "--overwrite").exit_code == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_resume_without_checkpoint_and_qlora_without_cuda_exit_2(write_recipe, tmp_path):
    recipe = write_recipe()
    result = train(recipe, "--resume")
    assert result.exit_code == 2 and "no checkpoint" in result.output
    if torch.cuda.is_available():
        return
    qlora = write_recipe(name="q.yaml", method={"name": "lora", "quantize": "4bit"})
    result = train(qlora)
    assert result.exit_code == 2
    assert "method.quantize: 4bit (QLoRA) needs a CUDA GPU" in result.output
    assert not (tmp_path / "run" / "recipe.yaml").exists()  # refused before loading anything


@pytest.mark.parametrize("content", ["", "\n  \n\r\n\n", "\ufeff\n"], ids=["empty", "blank", "bom"])
def test_empty_data_is_refused_by_train_and_data_before_a_run_dir_is_claimed(write_recipe, tmp_path, content):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(content, encoding="utf-8")
    recipe = write_recipe(data={"train": str(rows)})
    for command in ("train", "data"):
        result = runner.invoke(app, [command, str(recipe)])
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        assert f"data.train: {rows}: no rows (an empty data file)" in message
        assert f"`finetune {command}` needs rows" in message
        assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing claimed
    held_out = write_recipe(name="eval.yaml", data={"eval": str(rows)})
    result = train(held_out)
    assert result.exit_code == 2 and f"data.eval: {rows}: no rows" in " ".join(result.output.split())


@pytest.mark.slow
def test_validate_reports_everything_without_traceback(tmp_path, train_file):
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"data: {{train: {train_file}}}\nmethod: {{name: lora, rnak: 8}}\ntrain: {{learning_rat: 1}}\n")
    good = tmp_path / "good.yaml"
    good.write_text(f"data: {{train: {train_file}}}\nmethod: {{name: full}}\n")
    proc = subprocess.run([sys.executable, "-m", "finetune.cli", "validate", str(good), str(broken)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "ok" in proc.stdout and str(good) in proc.stdout
    assert "method.rnak: unknown key" in proc.stderr and "did you mean `learning_rate`?" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert subprocess.run([sys.executable, "-m", "finetune.cli", "validate", str(good)]).returncode == 0


def test_base_model_without_chatml_tokens_gets_them_and_lora_trains_their_rows(tmp_path, write_recipe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.tiny import build_tiny_llama, build_tokenizer

    base_dir = tmp_path / "base"
    tokenizer = build_tokenizer(special_tokens=("<|endoftext|>",), eos="<|endoftext|>")
    tokenizer.save_pretrained(base_dir)
    build_tiny_llama(len(tokenizer)).save_pretrained(base_dir)
    recipe = write_recipe(model={"name_or_path": str(base_dir)},
                          method={"name": "lora", "r": 4, "dropout": 0.0}, train={"learning_rate": 1e-2})
    result = train(recipe)
    assert result.exit_code == 0, result.output
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter")
    new_ids = saved.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert new_ids == [len(tokenizer), len(tokenizer) + 1]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(saved))
    before = base.get_input_embeddings().weight[new_ids].clone()
    merged = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").merge_and_unload()
    after = merged.get_input_embeddings().weight
    assert not torch.equal(after[new_ids], before)  # the new rows learned


def test_packing_and_a_dataset_directory_source(write_recipe, tmp_path, train_file):
    """A dataset directory goes through `datasets.load_dataset` (the hub-id path, minus the network)."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text(train_file.read_text())
    recipe = write_recipe(data={"train": str(folder), "train_split": "train"}, train={"packing": True})
    result = train(recipe)
    assert result.exit_code == 0, result.output
    assert len(losses(tmp_path / "run")) == 6
    missing = write_recipe(name="m.yaml", data={"train": str(folder), "train_split": "nope"})
    result = train(missing, "--overwrite")
    assert result.exit_code == 2 and "split `nope`" in result.output


@pytest.mark.parametrize("name", ["rows.json", "data.json", "rows.parquet"])
def test_an_empty_list_or_a_parquet_of_no_rows_is_refused_before_a_run_dir_is_claimed(write_recipe, tmp_path, name):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"messages": pa.array([], type=pa.string())}), rows)
    else:
        rows.write_text("[]\n" if name == "rows.json" else '{"data": []}\n')
    result = train(write_recipe(data={"train": str(rows)}))
    assert result.exit_code == 2 and f"data.train: {rows}: no rows" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()
