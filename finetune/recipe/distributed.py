"""The recipe's `distributed` section and the rules, checked before any model loads, for which method and strategy
combinations work (finetune.run.distributed launches the processes and turns the section into Trainer arguments)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune.recipe.section import Section


class DistributedSection(Section):
    """How many processes train and which engine (through accelerate) spreads the work across them."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    """`ddp`: every GPU holds the whole model, gradients are averaged (fastest when the model fits one GPU).
    `fsdp`: PyTorch FSDP2 shards weights, gradients and optimizer states (ZeRO-3 style). `deepspeed`: ZeRO at
    `zero_stage` (needs the `deepspeed` package)."""
    num_processes: int = Field(1, ge=1)
    """Processes (one per GPU) on each machine; `finetune train --nproc N` sets it."""
    num_machines: int = Field(1, ge=1)
    """Machines taking part; run the same command on each with its own `machine_rank`."""
    machine_rank: int = Field(0, ge=0)
    """This machine's index, 0 for the one at `main_process_ip` (only machine 0 writes the run dir)."""
    main_process_ip: str | None = None
    """Address of machine 0; required with more than one machine."""
    main_process_port: int = Field(29500, ge=1, le=65535)
    """Rendezvous port on machine 0 (29500 is torchrun's default)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Compute precision. `auto` follows `model.dtype` (bf16 weights compute in bf16); `bf16` with fp32 weights
    keeps fp32 master weights and computes in bf16 (FSDP then all-gathers bf16 and reduces in fp32)."""
    cpu_offload: bool = False
    """FSDP: keep sharded weights, gradients and states in CPU memory. DeepSpeed: offload optimizer states (and,
    at stage 3, weights) to the CPU. Slower steps for the largest models that fit no other way."""
    zero_stage: Literal[1, 2, 3] | None = None
    """DeepSpeed ZeRO stage (default 2: states and gradients sharded, weights whole on every GPU, the fastest
    stage when weights fit; 3 also shards weights)."""
    fsdp_reshard_after_forward: bool | None = None
    """FSDP: free gathered weights after forward (default true, ZeRO-3 memory); false keeps them until backward
    (ZeRO-2 style: faster, more memory)."""
    fsdp_wrap_layers: list[str] | None = None
    """FSDP: decoder-layer class names to shard as units (default: the model's own `_no_split_modules`, which is
    its decoder-layer class for transformers models)."""
    fsdp_state_dict_type: Literal["sharded", "full"] | None = None
    """FSDP checkpoints: `sharded` (default: one file per rank, fast) or `full`. The final weights are always
    consolidated into one standard checkpoint."""

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines


def compatibility_problems(method, dist: DistributedSection) -> list[str]:
    """Every combination of method and strategy that would fail or silently misbehave, with the alternative."""
    problems = []
    if dist.strategy == "none" and dist.world_size > 1:
        problems.append(f"distributed: {dist.world_size} processes need a strategy; set `distributed.strategy` to "
                        "ddp, fsdp or deepspeed")
    if dist.num_machines > 1 and not dist.main_process_ip:
        problems.append("distributed.main_process_ip: required with more than one machine (the address of machine 0)")
    if dist.machine_rank >= dist.num_machines:
        problems.append(f"distributed.machine_rank {dist.machine_rank}: must be below num_machines "
                        f"({dist.num_machines})")
    if dist.zero_stage is not None and dist.strategy != "deepspeed":
        problems.append("distributed.zero_stage: only means something with `strategy: deepspeed`")
    fsdp_only = [k for k in ("fsdp_reshard_after_forward", "fsdp_wrap_layers", "fsdp_state_dict_type")
                 if getattr(dist, k) is not None]
    if fsdp_only and dist.strategy != "fsdp":
        problems.append(f"distributed.{fsdp_only[0]}: only means something with `strategy: fsdp`")
    if dist.cpu_offload and dist.strategy not in ("fsdp", "deepspeed"):
        problems.append("distributed.cpu_offload: needs `strategy: fsdp` or `deepspeed` (DDP keeps a whole replica "
                        "per GPU)")

    if dist.strategy != "none":
        problem = method.strategy_problem(dist.strategy, dist.zero_stage)
        if problem:
            problems.append(problem)
    return problems
