"""Scaling out on accelerate: the launcher and the Trainer arguments for the recipe's `distributed` section
(finetune.recipe.distributed holds the section and its compatibility rules).

Nothing here distributes work itself. accelerate starts the processes (torchrun underneath) and the HF Trainer
drives PyTorch DDP, FSDP2 or DeepSpeed ZeRO. This module decides, from the recipe alone and so before any model
loads, which combinations work; turns the section into Trainer arguments (the same whether `finetune train
--nproc` launched the processes or the user's own `accelerate launch`/`torchrun` did); and writes the accelerate
(and DeepSpeed) config it launches with into the run dir, where the user can read and reuse it.

Importing this module loads no torch (`finetune validate` stays light).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import yaml

from finetune.deps import installed
from finetune.errors import RunStopped, UserError
from finetune.recipe.distributed import DistributedSection
from finetune.run import rundir

#: Set by the launcher for the processes it starts: the run dir it has already claimed for them.
LAUNCHED_RUN_DIR = "FINETUNE_LAUNCHED_RUN_DIR"


def launched() -> bool:
    """True inside a process started by accelerate launch / torchrun (ours or the user's)."""
    return "LOCAL_RANK" in os.environ


def world_rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_runtime(dist: DistributedSection) -> None:
    """Refuse before anything loads when this machine cannot run the chosen engine."""
    import accelerate
    import torch

    if dist.strategy in ("fsdp", "deepspeed") and not torch.cuda.is_available():
        # accelerate turns FSDP on only for GPU-like process groups: on CPU (gloo) it would quietly train plain DDP.
        raise UserError(f"distributed.strategy: {dist.strategy} needs CUDA GPUs, and this machine has none (accelerate "
                        f"{accelerate.__version__} runs FSDP and DeepSpeed only on accelerators; on CPU it would fall "
                        "back to DDP without saying so). Use `distributed.strategy: ddp` here")
    if dist.strategy == "deepspeed" and not installed("deepspeed"):
        raise UserError("distributed.strategy: deepspeed needs the `deepspeed` package, which is not installed. "
                        "Install it on a CUDA machine with `pip install 'finetune[deepspeed]'`, or use "
                        "`distributed.strategy: fsdp` (PyTorch's own ZeRO-3) or ddp")


def mixed_precision(dist: DistributedSection, model_dtype: str, weights_are_bf16: bool) -> str:
    if dist.mixed_precision != "auto":
        return dist.mixed_precision
    return "bf16" if weights_are_bf16 else "fp16" if model_dtype == "fp16" else "no"


def fsdp_config(dist: DistributedSection, gradient_checkpointing: bool) -> dict:
    """transformers' `fsdp_config` for the section (FSDP2)."""
    config = {
        "version": 2,
        "reshard_after_forward": dist.fsdp_reshard_after_forward is not False,
        "cpu_offload": dist.cpu_offload,
        "state_dict_type": "FULL_STATE_DICT" if dist.fsdp_state_dict_type == "full" else "SHARDED_STATE_DICT",
        # FSDP's own checkpointing wraps each sharded layer; the trainer's would add an all-gather in backward.
        "activation_checkpointing": gradient_checkpointing,
    }
    if dist.fsdp_wrap_layers:
        config["transformer_layer_cls_to_wrap"] = dist.fsdp_wrap_layers
    return config


def trainer_kwargs(dist: DistributedSection, method, gradient_checkpointing: bool) -> dict:
    """Arguments for the Trainer that select and configure the strategy in every process."""
    if dist.strategy == "fsdp":
        return {"fsdp": True, "fsdp_config": fsdp_config(dist, gradient_checkpointing),
                "activation_checkpointing": False}
    if dist.strategy == "deepspeed":
        return {"deepspeed": deepspeed_config(dist)}
    if dist.strategy == "ddp" and method.changes_trainable_set:
        # DDP's reducer covers only the parameters that require grad when it wraps the model; such a method (LISA)
        # has every parameter trainable at that moment (finetune.run.trainer) and the idle ones are then "unused".
        return {"ddp_find_unused_parameters": True}
    if dist.strategy == "ddp":
        # Every other method uses every trainable parameter each step; the trainer would otherwise turn on the
        # per-step search for unused ones whenever checkpointing is off.
        return {"ddp_find_unused_parameters": False}
    return {}


def deepspeed_config(dist: DistributedSection) -> dict:
    """A ZeRO config whose batch, clipping and precision fields ("auto") the Trainer fills from the recipe."""
    stage = dist.zero_stage or 2
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if dist.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # the final save is one consolidated checkpoint
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_clipping": "auto",
        "gradient_accumulation_steps": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
    }


def accelerate_config(dist: DistributedSection, precision: str, deepspeed_file: Path | None) -> dict:
    """The `accelerate launch --config_file` contents for this section (static rendezvous, one port)."""
    kind = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[dist.strategy]
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": kind,
        "num_processes": dist.world_size,  # accelerate counts processes over all machines
        "num_machines": dist.num_machines,
        "machine_rank": dist.machine_rank,
        "main_process_port": dist.main_process_port,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": precision,
        "use_cpu": False,  # on a machine without GPUs the trainer picks gloo over CPU itself
    }
    if dist.main_process_ip:
        config["main_process_ip"] = dist.main_process_ip
    if dist.strategy == "fsdp":
        fsdp = fsdp_config(dist, gradient_checkpointing=False)
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": fsdp["reshard_after_forward"],
            "fsdp_offload_params": fsdp["cpu_offload"],
            "fsdp_state_dict_type": fsdp["state_dict_type"],
        }
        if dist.fsdp_wrap_layers:
            config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = ",".join(dist.fsdp_wrap_layers)
    if dist.strategy == "deepspeed":
        config["deepspeed_config"] = {"deepspeed_config_file": str(deepspeed_file)}
    return config


def write_launch_files(dist: DistributedSection, precision: str, where: Path) -> Path:
    """Write accelerate.yaml (and deepspeed.json) into `where`; return the accelerate config's path."""
    deepspeed_file = None
    if dist.strategy == "deepspeed":
        deepspeed_file = (where / "deepspeed.json").resolve()
        deepspeed_file.write_text(json.dumps(deepspeed_config(dist), indent=2) + "\n")
    path = where / "accelerate.yaml"
    header = ("# Written by `finetune train`; reuse with: "
              "accelerate launch --config_file THIS -m finetune.cli train ...\n")
    path.write_text(header + yaml.safe_dump(accelerate_config(dist, precision, deepspeed_file), sort_keys=False))
    return path


def launch(config_file: Path, recipe_path: Path, run_dir: Path, overrides: list[str], resume: bool, log=print) -> int:
    """Start the recipe's processes through accelerate's launcher (in this process, which becomes torchrun's
    agent) and return their exit status: 0, or the highest a process failed with (2: an error it has printed)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    command = ["--config_file", str(config_file), "-m", "finetune.cli", "train", str(recipe_path),
               "--output", str(run_dir)]
    for override in overrides:
        command += ["--set", override]
    if resume:
        command.append("--resume")
    log(f"launching: accelerate launch {' '.join(command)}")
    os.environ[LAUNCHED_RUN_DIR] = str(run_dir.resolve())
    # Ctrl-C / SIGTERM: the processes stop together after a checkpoint (finetune.run.guards.StopOnSignal). torch
    # elastic's agent would answer the signal by terminating them (SIGKILL after 30 s, mid-save for a large model),
    # so it leaves SIGINT and SIGTERM to us and we pass them on (a process that also got it from its process
    # group counts the two as one).
    arguments = launch_command_parser().parse_args(command)
    arguments.signals_to_handle = "SIGHUP,SIGQUIT"  # torchrun's --signals_to_handle; accelerate passes it through
    previous = {sig: signal.signal(sig, _pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        launch_command(arguments)
    except ChildFailedError as err:  # the processes printed their own errors; the agent's traceback adds nothing
        return max(failure.exitcode for failure in err.failures.values())
    except SystemExit as err:  # the DeepSpeed launcher exits instead of raising
        return int(err.code or 0)
    finally:
        del os.environ[LAUNCHED_RUN_DIR]
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def launch_run(recipe, recipe_path: Path, run_dir: Path, overwrite: bool, resume: bool, overrides: list[str], log,
               inputs: tuple[str, ...]) -> Path:
    """Claim the run dir here (never deleting `inputs`, the run's own model and data), write the launch config into
    it, and start the processes through accelerate."""
    import tempfile

    import torch

    from finetune.models.load import resolve_dtype

    dist = recipe.distributed
    if dist.machine_rank == 0:  # other machines write nothing: their config goes to a temporary directory
        rundir.claim(run_dir, recipe.model_dump(mode="json"), overwrite, resume, log, inputs)
        where = run_dir
    else:
        where = Path(tempfile.mkdtemp(prefix="finetune-launch-"))
    precision = mixed_precision(dist, recipe.model.dtype,
                                            resolve_dtype(recipe.model.dtype) == torch.bfloat16)
    config = write_launch_files(dist, precision, where)
    code = launch(config, recipe_path, run_dir, overrides, resume, log)
    if code == RunStopped.INTERRUPTED:
        raise RunStopped(f"interrupted; the processes' messages above say where to continue from ({run_dir})",
                         exit_code=code)
    if code != 0:
        raise UserError(f"the distributed run stopped: its processes' errors are above (exit status {code}). It was "
                        f"launched with {config}")
    return run_dir


def _pass_on(signum, frame) -> None:
    import psutil  # an accelerate dependency

    for child in psutil.Process().children():
        child.send_signal(signum)


def process_state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # CPU-only machines train over gloo


def close_process_group(wrapped_model) -> None:
    """Every rank closes its process group before it returns (left to interpreter exit, gloo threads can abort the
    rank). DDP's Reducer goes first: the group's destructor run from it holds the GIL a gloo thread waits for."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped_model, DistributedDataParallel):
        wrapped_model.logger = wrapped_model.reducer = None  # the logger holds the Reducer too
    if dist.is_initialized():
        dist.destroy_process_group()
