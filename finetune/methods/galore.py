"""GaLore: full-parameter training with gradients projected to a low-rank subspace (arXiv 2403.03507),
stepped layer-wise inside backward with 8-bit or 32-bit AdamW (finetune.optim)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune.methods.base import Section, train_all


class Options(Section):
    """GaLore: every parameter trains; target linear weights get low-rank projected optimizer states."""

    name: Literal["galore"] = "galore"
    rank: int = Field(128, gt=0)
    """Projection rank. 128 is the paper's setting below 1B parameters; seed 000 uses 1024 for 7B."""
    update_proj_gap: int = Field(200, ge=1)
    """Optimizer steps between subspace refreshes (the paper's 200)."""
    scale: float = Field(0.25, gt=0)
    """Multiplier on the projected-back update (the paper's 0.25; seed 000 uses 2)."""
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    """Which side to project: `std` projects the smaller dimension."""
    target_modules: Literal["all-linear"] | list[str] = Field(default_factory=lambda: ["attn", "mlp"])
    """Linear layers whose weights are projected: name substrings (seed 000: attn, mlp) or `all-linear`.
    Everything else (embeddings, norms, head) trains with plain AdamW of `optim_bits`."""
    optim_bits: Literal[8, 32] = 8
    """AdamW state precision (8-bit via bitsandbytes): 8 quarters the optimizer memory."""
    layerwise: bool = True
    """Step each parameter inside backward and free its gradient at once: no full set of gradients in memory."""
    svd: Literal["full", "randomized"] = "randomized"
    """Subspace refresh: exact SVD, or a randomized range finder that costs a fraction of it."""
    seed: int = 0
    """Seeds the randomized refresh."""


class GaLore:
    name = "galore"
    artifact = "model"

    def __init__(self, rank, update_proj_gap, scale, proj_type, target_modules, optim_bits, layerwise, svd, seed):
        self.rank, self.gap, self.scale, self.proj_type = rank, update_proj_gap, scale, proj_type
        self.target_modules, self.bits, self.layerwise, self.svd, self.seed = (
            target_modules, optim_bits, layerwise, svd, seed)

    def load_kwargs(self):
        return {}

    def prepare(self, model, new_token_ids):
        return train_all(model)

    def optimizers(self, model, learning_rate, weight_decay, max_grad_norm):
        from finetune.optim.galore import Projector
        from finetune.optim.layerwise import build_optimizer

        targets = projected_weights(model, self.target_modules)
        index = {name: i for i, name in enumerate(sorted(targets))}

        def projector_for(name, param):
            if name not in targets:
                return None
            return Projector(self.rank, self.gap, self.scale, self.proj_type, self.svd, seed=self.seed + 7919 * index[name])

        optimizer = build_optimizer(model, learning_rate, weight_decay, self.bits, self.layerwise, max_grad_norm,
                                    projector_for)
        return optimizer, None

    def callbacks(self):
        return []


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


def build(**options) -> GaLore:
    return GaLore(**options)
