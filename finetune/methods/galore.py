"""GaLore: full-parameter training with gradients projected to a low-rank subspace (arXiv 2403.03507),
stepped layer-wise inside backward with 8-bit or 32-bit AdamW (finetune.optim)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from finetune.methods import base


class Options(base.MethodOptions):
    """GaLore: every parameter trains; target linear weights get low-rank projected optimizer states."""

    name: Literal["galore"] = "galore"
    rank: int = Field(128, gt=0)
    """Projection rank. 128 is the paper's setting below 1B parameters; it uses 1024 for 7B (arXiv 2403.03507)."""
    update_proj_gap: int = Field(200, ge=1)
    """Optimizer steps between subspace refreshes (the paper's 200)."""
    scale: float = Field(0.25, gt=0)
    """Multiplier on the projected-back update (the paper's 0.25 for pre-training)."""
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    """Which side to project: `std` projects the smaller dimension."""
    target_modules: Literal["all-linear"] | list[str] = Field(default_factory=lambda: ["attn", "mlp"])
    """Linear layers whose weights are projected: name substrings (the paper's attn, mlp) or `all-linear`.
    Everything else (embeddings, norms, head) trains with plain AdamW of `optim_bits`."""
    optim_bits: Literal[8, 32] = 8
    """AdamW state precision (8-bit via bitsandbytes): 8 quarters the optimizer memory."""
    layerwise: bool = True
    """Step each parameter inside backward and free its gradient at once: no full set of gradients in memory."""
    svd: Literal["full", "randomized"] = "randomized"
    """Subspace refresh: exact SVD, or a randomized range finder that costs a fraction of it."""
    seed: int = 0
    """Seeds the randomized refresh."""

    uses_own_optimizer: ClassVar[bool] = True

    def strategy_problem(self, strategy, zero_stage):
        if strategy in ("fsdp", "deepspeed"):
            return (f"method galore with strategy {strategy}: GaLore projects each weight's whole 2-D gradient and "
                    "steps its own optimizer, while sharded engines split gradients across ranks and own the "
                    "optimizer. Use `distributed.strategy: ddp` (layer-wise GaLore works there: each parameter steps "
                    "after DDP has averaged its gradient)")
        return None

    def planned_rows(self, model, trainable, setup):
        import math

        from finetune.optim.galore import low_rank_shape
        from finetune.plan.memory import adam_state_bytes, gradient_bytes

        params, wb = dict(model.named_parameters()), setup.weight_bytes
        projected = projected_weights(model, self.target_modules)
        states = projectors = largest_proxy = 0
        for name, numel in trainable.items():
            if name in projected:
                shape = tuple(params[name].shape)
                r = min(self.rank, *shape)
                low = math.prod(low_rank_shape(shape, self.rank, self.proj_type))
                projectors += (r * min(shape) if self.proj_type != "full" else r * sum(shape)) * wb
                states += adam_state_bytes(low, self.optim_bits, wb)
                largest_proxy = max(largest_proxy, low * wb)
            else:
                states += adam_state_bytes(numel, self.optim_bits, wb)
        return {"optimizer states": states, "galore projectors": projectors,
                "gradients": gradient_bytes(trainable, params, wb, self.layerwise, setup.accumulation),
                "transient": largest_proxy}  # the low-rank update being applied

    def planned_step_flops(self, model):
        """Each projected m x n gradient goes down to rank r and its update back up: two matmuls of 2rmn FLOPs (the
        subspace refresh, every update_proj_gap steps, is left out: a fraction of one step over the gap)."""
        params = dict(model.named_parameters())
        return sum(4 * min(self.rank, *params[n].shape) * params[n].numel()
                   for n in projected_weights(model, self.target_modules))

    @classmethod
    def plan_alternatives(cls, like):
        rank = getattr(like, "rank", 128)
        return {f"GaLore r={rank} layer-wise 8-bit": cls(rank=rank, optim_bits=8, layerwise=True)}

    @classmethod
    def memory_savers(cls):
        return [(2, cls(optim_bits=8, layerwise=True), "method.name: galore with optim_bits 8, layerwise")]


class GaLore(base.Method):
    name = "galore"

    def __init__(self, rank, update_proj_gap, scale, proj_type, target_modules, optim_bits, layerwise, svd, seed):
        self.rank, self.update_proj_gap, self.scale, self.proj_type = rank, update_proj_gap, scale, proj_type
        self.target_modules, self.optim_bits, self.layerwise, self.svd, self.seed = (
            target_modules, optim_bits, layerwise, svd, seed)
        self.projectors = []  # every projector built, for whoever watches the run (refresh counts and times)

    def optimizers(self, model, learning_rate, weight_decay, max_grad_norm):
        from finetune.optim.galore import Projector
        from finetune.optim.layerwise import build_optimizer

        targets = projected_weights(model, self.target_modules)
        index = {name: i for i, name in enumerate(sorted(targets))}

        def projector_for(name, param):
            if name not in targets:
                return None
            projector = Projector(self.rank, self.update_proj_gap, self.scale, self.proj_type, self.svd,
                                  seed=self.seed + 7919 * index[name])
            self.projectors.append(projector)
            return projector

        optimizer = build_optimizer(model, learning_rate, weight_decay, self.optim_bits, self.layerwise, max_grad_norm,
                                    projector_for)
        return optimizer, None


def projected_weights(model, target_modules) -> set[str]:
    """Parameter names of the 2-D linear weights GaLore projects (never the output head)."""
    import torch

    head = model.get_output_embeddings()
    names = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if target_modules == "all-linear" or any(t in module_name for t in target_modules):
            names.add(f"{module_name}.weight")
    return names


Method = GaLore  # the registry builds `Method` from `Options`
