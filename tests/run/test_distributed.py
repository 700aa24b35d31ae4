"""Scaling out: compatibility rules, launch configs, and real 2-process DDP runs on CPU (gloo) of the tiny model."""

import pytest
import torch
import yaml
from helpers.launch import free_port, launch, max_diff, runner, single

from finetune.cli import app
from finetune.recipe.distributed import DistributedSection
from finetune.run.distributed import accelerate_config, deepspeed_config
from finetune.run.report import read_metrics

LISA = {"name": "lisa", "activated_layers": 1, "interval_steps": 2}


@pytest.fixture
def ddp_recipe(write_recipe, tiny4_model_dir):
    def write(**sections):
        train = {"batch_size": 2, **sections.pop("train", {})}
        return write_recipe(model={"name_or_path": str(tiny4_model_dir)}, distributed={"strategy": "ddp"},
                            train=train, **sections)

    return write


FORBIDDEN = [
    ({"name": "galore"}, {"strategy": "fsdp"}, "method galore with strategy fsdp"),
    ({"name": "galore", "layerwise": False}, {"strategy": "deepspeed"}, "method galore with strategy deepspeed"),
    (LISA, {"strategy": "fsdp"}, "method lisa with strategy fsdp"),
    (LISA, {"strategy": "deepspeed"}, "method lisa with strategy deepspeed"),
    ({"name": "full", "layerwise": True}, {"strategy": "fsdp"}, "per-parameter (8-bit, layer-wise) optimizers"),
    ({"name": "full", "optim_bits": 8}, {"strategy": "deepspeed"}, "per-parameter (8-bit, layer-wise) optimizers"),
    ({"name": "lora", "quantize": "4bit"}, {"strategy": "fsdp"}, "QLoRA) and strategy fsdp"),
    ({"name": "lora", "quantize": "4bit"}, {"strategy": "deepspeed", "zero_stage": 3}, "QLoRA) and ZeRO-3"),
    ({"name": "full"}, {"num_processes": 2}, "2 processes need a strategy"),
    ({"name": "full"}, {"strategy": "ddp", "num_machines": 2}, "main_process_ip: required"),
    ({"name": "full"}, {"strategy": "ddp", "zero_stage": 2}, "zero_stage: only means something"),
    ({"name": "full"}, {"strategy": "ddp", "cpu_offload": True}, "cpu_offload: needs"),
]


@pytest.mark.parametrize("method,dist,message", FORBIDDEN, ids=[f"{m['name']}-{d}" for m, d, _ in FORBIDDEN])
def test_forbidden_combinations_exit_2_before_any_model_loads(write_recipe, monkeypatch, method, dist, message):
    import finetune.models.load

    monkeypatch.setattr(finetune.models.load, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    result = runner.invoke(app, ["train", str(write_recipe(method=method, distributed=dist))])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_refuse_cpu_instead_of_falling_back_to_ddp(write_recipe, strategy, tmp_path):
    result = launch(write_recipe(distributed={"strategy": strategy}), tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "needs CUDA GPUs" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_launch_configs_carry_the_recipe(tmp_path):
    fsdp = DistributedSection(strategy="fsdp", num_processes=4, num_machines=2, main_process_ip="10.0.0.1",
                              fsdp_reshard_after_forward=False, cpu_offload=True,
                              fsdp_wrap_layers=["LlamaDecoderLayer"])
    config = accelerate_config(fsdp, "bf16", None)
    assert config["distributed_type"] == "FSDP" and config["num_processes"] == 8 and config["mixed_precision"] == "bf16"
    assert config["fsdp_config"]["fsdp_reshard_after_forward"] is False
    assert config["fsdp_config"]["fsdp_offload_params"] is True
    assert config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    zero3 = deepspeed_config(DistributedSection(strategy="deepspeed", zero_stage=3, cpu_offload=True))
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "offload_param" not in deepspeed_config(DistributedSection(strategy="deepspeed", cpu_offload=True))[
        "zero_optimization"]  # ZeRO-2 shards no weights, so there are none to offload


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(ddp_recipe, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    recipe = ddp_recipe()
    result = launch(recipe, tmp_path / "ddp")
    assert result.exit_code == 0, result.output
    both = capfd.readouterr()
    # The data is prepared once: one rank under the cache's lock, the other reads what it wrote.
    [record] = (tmp_path / "cache" / "data").glob("*.prepared")
    assert len(record.read_text().splitlines()) == 1
    assert single(recipe, tmp_path / "one").exit_code == 0
    run = tmp_path / "ddp"
    config = yaml.safe_load((run / "accelerate.yaml").read_text())
    assert config["distributed_type"] == "MULTI_GPU" and config["num_processes"] == 2
    assert yaml.safe_load((run / "recipe.yaml").read_text())["distributed"]["num_processes"] == 2
    records = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))  # one writer: rank 0
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    printed = both.out  # the processes' own output
    assert " ".join(printed.split()).count("2 device(s) = 4 rows") == 1  # the summary, from rank 0 only
    difference = max_diff(run / "model", tmp_path / "one" / "model")
    assert difference < 1e-4, difference
    # tokens/s counts every rank's tokens: the two runs see the same tokens per step.
    seen = [r["tokens_per_s"] * r["step_seconds"] for r in records]
    alone = [r["tokens_per_s"] * r["step_seconds"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")
             if "loss" in r]
    assert seen == pytest.approx(alone, rel=1e-6)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.slow
def test_layerwise_optimizer_under_ddp_steps_on_averaged_gradients(ddp_recipe, tmp_path, tiny4_model_dir, bits):
    """Peers refuse layer-wise optimizers under DDP; ours step after DDP's all-reduce, also with accumulation."""
    recipe = ddp_recipe(method={"name": "full", "layerwise": True, "optim_bits": bits},
                        train={"gradient_accumulation_steps": 2})
    assert launch(recipe, tmp_path / "ddp").exit_code == 0
    assert single(recipe, tmp_path / "one").exit_code == 0
    difference = max_diff(tmp_path / "ddp" / "model", tmp_path / "one" / "model")
    if bits == 32:
        assert difference < 1e-4
    else:
        # 8-bit AdamW quantises its states blockwise: gloo's summation order changes gradients in their last bits,
        # which can move a state across a quantisation step (a CPU-dependent few % of the update). Gradients that
        # were not averaged, or a second step, would differ by the order of the whole update.
        update = max_diff(tmp_path / "one" / "model", tiny4_model_dir)
        assert difference < 0.05 * update, (difference, update)
    ddp = [r["grad_norm"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "loss" in r]
    one = [r["grad_norm"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    assert ddp == pytest.approx(one, rel=1e-4) and min(ddp) > 0


@pytest.mark.slow
def test_lisa_under_ddp_trains_the_same_layers_on_every_rank(ddp_recipe, tmp_path, tiny4_model_dir):
    recipe = ddp_recipe(method={**LISA, "layerwise": True}, train={"max_steps": 8})
    assert launch(recipe, tmp_path / "ddp").exit_code == 0
    switches = [r for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if "active_layers" in r]
    assert len(switches) >= 3 and len({tuple(r["active_layers"]) for r in switches}) >= 2
    for record in switches:
        assert record["active_layers_by_rank"] == [record["active_layers"]] * 2
    assert single(recipe, tmp_path / "one").exit_code == 0
    assert max_diff(tmp_path / "ddp" / "model", tmp_path / "one" / "model") < 1e-4


@pytest.mark.slow
def test_ddp_resume_continues_like_an_uninterrupted_run(ddp_recipe, tmp_path):
    recipe = ddp_recipe(method={"name": "full", "layerwise": True, "optim_bits": 8}, train={"save_steps": 3})
    assert launch(recipe, tmp_path / "whole").exit_code == 0
    assert launch(recipe, tmp_path / "cut", "--set", "train.max_steps=3").exit_code == 0
    result = launch(recipe, tmp_path / "cut", "--resume")
    assert result.exit_code == 0, result.output
    assert max_diff(tmp_path / "whole" / "model", tmp_path / "cut" / "model") < 1e-6
    steps = [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 7))


def test_running_under_a_launcher_without_a_strategy_is_refused(write_recipe, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["train", str(write_recipe())])
    assert result.exit_code == 2 and "distributed.strategy` is none" in " ".join(result.output.split())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=(
    "FSDP needs 2 CUDA GPUs: the installed accelerate enables FSDP only for GPU-like process groups (on a gloo CPU "
    "group AcceleratorState ignores ACCELERATE_USE_FSDP and wraps plain DDP), so CPU cannot exercise it"))
def test_fsdp_two_gpus_equal_one_process(ddp_recipe, tmp_path):
    recipe = ddp_recipe(distributed={"strategy": "fsdp"})
    assert launch(recipe, tmp_path / "fsdp").exit_code == 0
    assert single(recipe, tmp_path / "one").exit_code == 0
    assert max_diff(tmp_path / "fsdp" / "model", tmp_path / "one" / "model") < 1e-3


def test_validate_reports_every_distributed_problem(write_recipe):
    recipe = write_recipe(method=LISA, distributed={"strategy": "fsdp", "zero_stage": 3})
    result = runner.invoke(app, ["validate", str(recipe)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "method lisa with strategy fsdp" in text and "zero_stage: only means" in text
    assert "2 problems" in text and "recipe:" not in text  # each cross-section problem counted and listed alone


@pytest.mark.slow
def test_two_machines_on_localhost_train_like_two_processes(ddp_recipe, tmp_path):
    """Multi-node flags: two `finetune train` commands, machine ranks 0 and 1, meet at machine 0's address; only
    machine 0 writes, and the result equals one process with the same global batch."""
    import subprocess
    import sys

    recipe, port = ddp_recipe(), str(free_port())
    command = [sys.executable, "-m", "finetune.cli", "train", str(recipe), "--nproc", "1", "--num-machines", "2",
               "--main-process-ip", "127.0.0.1", "--main-process-port", port, "--output", str(tmp_path / "run")]
    # stderr goes to files, not pipes: waiting on machine 0 while machine 1 fills its 64 KiB pipe with progress
    # bars blocks machine 1 inside a collective and deadlocks both (a hang seen once in a full run).
    logs = [tmp_path / f"machine{rank}.log" for rank in (0, 1)]
    machines = []
    for rank, log in enumerate(logs):
        with log.open("w") as stderr:
            machines.append(subprocess.Popen([*command, "--machine-rank", str(rank)], stdout=subprocess.DEVNULL,
                                             stderr=stderr))
    for machine, log in zip(machines, logs):
        machine.wait(timeout=300)
        assert machine.returncode == 0, log.read_text()[-3000:]
    assert single(recipe, tmp_path / "one").exit_code == 0
    assert max_diff(tmp_path / "run" / "model", tmp_path / "one" / "model") < 1e-4
    config = yaml.safe_load((tmp_path / "run" / "accelerate.yaml").read_text())
    assert config["num_machines"] == 2 and config["machine_rank"] == 0 and config["main_process_ip"] == "127.0.0.1"


@pytest.mark.slow
def test_under_the_users_own_torchrun_rank_0_claims_the_run_dir(ddp_recipe, tmp_path):
    import subprocess
    import sys

    recipe = ddp_recipe()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "finetune.cli", "train", str(recipe), "--output", str(tmp_path / "run")]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "holds files finetune did not write" in " ".join(refused.stderr.split())
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"  # nothing lost
    (tmp_path / "run" / "precious.txt").unlink()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "run" / "accelerate.yaml").exists()  # the user's launcher, not ours
    assert single(recipe, tmp_path / "one").exit_code == 0
    assert max_diff(tmp_path / "run" / "model", tmp_path / "one" / "model") < 1e-4


def test_fsdp_section_becomes_transformers_fsdp2_plugin(tmp_path):
    """What can be checked of FSDP without GPUs: the recipe reaches accelerate's FSDP2 plugin as intended, with
    FSDP's own per-layer checkpointing instead of the trainer's."""
    from pathlib import Path

    from finetune.recipe.load import load_recipe
    from finetune.run.arguments import trainer_args

    root = Path(__file__).resolve().parents[2]
    recipe = load_recipe(root / "recipes" / "llama7b-fsdp.yaml",
                         ["distributed.fsdp_wrap_layers=[LlamaDecoderLayer]", "distributed.cpu_offload=true",
                          "distributed.fsdp_reshard_after_forward=false"])
    args = trainer_args(recipe, tmp_path, torch.bfloat16)
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["cpu_offload"] is True
    assert plugin["reshard_after_forward"] is False and plugin["state_dict_type"] == "SHARDED_STATE_DICT"
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["activation_checkpointing"] is True and args.activation_checkpointing is False
    assert args.bf16


@pytest.mark.slow
def test_an_error_inside_the_processes_exits_2_without_a_launcher_traceback(ddp_recipe, tmp_path, capfd):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    result = launch(ddp_recipe(data={"train": str(bad)}), tmp_path / "run")
    printed = capfd.readouterr()
    text = " ".join((result.output + printed.out + printed.err).split())
    assert result.exit_code == 2
    assert text.count("bad.jsonl:1:") == 1  # the row-level data error, printed once (by local rank 0)
    assert "the distributed run stopped" in text and "Traceback" not in text and "ChildFailedError" not in text
