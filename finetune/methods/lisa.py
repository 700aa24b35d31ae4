"""LISA: Layerwise Importance Sampled AdamW (arXiv 2403.17919).

Embeddings and head always train; of the decoder layers only `activated_layers` randomly chosen ones do,
re-sampled every `interval_steps` optimizer steps. Peers only flip `requires_grad`, so their optimizer keeps
the Adam state of every layer ever activated and memory grows with each switch. Here a switch removes the
deactivated layers' per-parameter optimizers (state and gradients released) and creates fresh ones for the new
layers, so memory is bounded by the active set. The schedule is a pure function of (seed, interval index):
every rank of a distributed run and every resumed run trains the same layers; checkpoints also record the
active set, which `load_state_dict` restores before loading the optimizer states.
"""

from __future__ import annotations

import random
from typing import ClassVar, Literal

from pydantic import Field

from finetune.errors import UserError
from finetune.methods import base


class Options(base.MethodOptions):
    """LISA: train embeddings, head and a few sampled decoder layers at a time."""

    name: Literal["lisa"] = "lisa"
    activated_layers: int = Field(2, ge=1)
    """Decoder layers trained at once (the paper's gamma; it uses 2 for 7B models)."""
    interval_steps: int = Field(20, ge=1)
    """Optimizer steps between re-samplings (the paper's K)."""
    train_embeddings: bool = True
    """Always train the input embeddings, as the paper does."""
    train_head: bool = True
    """Always train the output head, as the paper does."""
    always_active: list[int] = Field(default_factory=list)
    """Decoder layer indices trained in every interval, besides the sampled ones."""
    optim_bits: Literal[8, 32] = 32
    """AdamW state precision for the trained parameters (8-bit via bitsandbytes)."""
    layerwise: bool = False
    """Step each parameter inside backward and free its gradient at once."""
    seed: int = 0
    """Seeds the layer schedule."""

    uses_own_optimizer: ClassVar[bool] = True
    changes_trainable_set: ClassVar[bool] = True

    def strategy_problem(self, strategy, zero_stage):
        if strategy in ("fsdp", "deepspeed"):
            return (f"method lisa with strategy {strategy}: LISA changes which layers train during the run, while "
                    "sharded engines fix the trainable set when they wrap the model. Use `distributed.strategy: ddp` "
                    "(every rank samples the same layers)")
        return None

    @property
    def head_trains(self) -> bool:
        return self.train_head

    def planned_trainable(self, model):
        prefix, layers = decoder_layers(model)
        frozen = frozen_outside_layers(model, layers, self.train_embeddings, self.train_head)
        keep = {n: p.numel() for n, p in model.named_parameters() if id(p) not in frozen}
        active = self.activated_layers + len(set(self.always_active))  # the blocks are alike: any of them
        for index in range(active):
            keep.update({f"{prefix}.{index}.{n}": p.numel() for n, p in layers[index].named_parameters()})
        return keep

    @classmethod
    def plan_alternatives(cls, like):
        gamma = getattr(like, "activated_layers", 2)
        return {f"LISA g={gamma}": cls(activated_layers=gamma)}


def decoder_layers(model):
    """The stack of decoder blocks of any causal LM: the ModuleList of same-typed blocks holding the most
    parameters (no per-architecture table); in a vision-language model, the language model's."""
    import torch

    from finetune.models.vision import language_prefix

    best, best_size, within = None, 0, language_prefix(model)
    for name, module in model.named_modules():
        if within and not name.startswith(within + "."):
            continue
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise UserError("method lisa: found no stack of decoder layers (an nn.ModuleList of blocks) in this model")
    return best


def frozen_outside_layers(model, layers, train_embeddings: bool, train_head: bool) -> set[int]:
    """ids of the parameters LISA does not train between switches: every decoder layer, and the embeddings or
    head when the options say so (the final norm always trains)."""
    frozen = {id(p) for p in layers.parameters()}
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight and train_embeddings != train_head:
        raise UserError(f"method.train_embeddings is {train_embeddings} and method.train_head is {train_head}, but "
                        "this model ties its head to its input embeddings (one tensor): set both to the same value")
    if not train_embeddings:
        frozen.add(id(model.get_input_embeddings().weight))
    if not train_head and head is not None:
        frozen.add(id(head.weight))
    return frozen


class LISA(base.Method):
    name = "lisa"

    def __init__(self, activated_layers, interval_steps, train_embeddings, train_head, always_active, optim_bits,
                 layerwise, seed):
        self.activated_layers, self.interval_steps = activated_layers, interval_steps
        self.always_active = sorted(set(always_active))
        self.train_embeddings, self.train_head = train_embeddings, train_head
        self.optim_bits, self.layerwise, self.seed = optim_bits, layerwise, seed
        # Bound by `prepare` (the model) and `optimizers` (its optimizer and weight decay).
        self.model, self.prefix, self.n_layers = None, "", 0
        self.optimizer, self.weight_decay = None, 0.0
        self.active: list[int] = []

    def layers_for(self, interval_index: int) -> list[int]:
        """The layers trained during interval k: the always-active ones plus gamma sampled from the rest."""
        candidates = [i for i in range(self.n_layers) if i not in self.always_active]
        rng = random.Random(f"lisa:{self.seed}:{interval_index}")
        return sorted(self.always_active + rng.sample(candidates, self.activated_layers))

    def prepare(self, model, new_token_ids):
        prefix, layers = decoder_layers(model)
        self.n_layers, self.prefix = len(layers), prefix
        bad = [i for i in self.always_active if not 0 <= i < self.n_layers]
        if bad or self.activated_layers + len(self.always_active) > self.n_layers:
            raise UserError(f"method.always_active {self.always_active} / activated_layers {self.activated_layers}: "
                            "the model has "
                            f"{self.n_layers} decoder layers (indices 0..{self.n_layers - 1})")
        self.model = model
        frozen = frozen_outside_layers(model, layers, self.train_embeddings, self.train_head)
        for param in model.parameters():
            param.requires_grad_(id(param) not in frozen)
        self._set_layers(self.layers_for(0))
        return model

    def _layer_params(self, index: int) -> dict:
        prefix = f"{self.prefix}.{index}."
        return {name: p for name, p in self.model.named_parameters() if name.startswith(prefix)}

    def _set_layers(self, indices: list[int]) -> None:
        """Freeze the layers leaving, unfreeze those entering; move their optimizer steppers with them."""
        from finetune.optim.layerwise import new_stepper

        for index in set(self.active) - set(indices):
            for name, param in self._layer_params(index).items():
                param.requires_grad_(False)
                param.grad = None
                if self.optimizer is not None:
                    self.optimizer.remove_stepper(name)
        for index in set(indices) - set(self.active):
            for name, param in self._layer_params(index).items():
                param.requires_grad_(True)
                if self.optimizer is not None:
                    self.optimizer.add_stepper(name, new_stepper(param, self.optimizer.lr, self.weight_decay,
                                                                 self.optim_bits))
        self.active = sorted(indices)

    def optimizers(self, model, learning_rate, weight_decay, max_grad_norm):
        from finetune.optim.layerwise import build_optimizer

        self.weight_decay = weight_decay
        self.optimizer = build_optimizer(
            model, learning_rate, weight_decay, self.optim_bits, self.layerwise, max_grad_norm,
            method_state=(lambda: {"active_layers": list(self.active)},
                          lambda state: self._set_layers(state["active_layers"])),
        )
        return self.optimizer, None

    def callbacks(self):
        return [layer_switcher(self)]


def layer_switcher(method: LISA):
    """A trainer callback that, at the start of every optimizer step (never inside an accumulation window),
    trains the layers the schedule names for this interval; a switch forces a log line with the new layers.
    Built on demand so that importing the method registry (e.g. `finetune validate`) loads no transformers."""
    from transformers import TrainerCallback

    class LayerSwitcher(TrainerCallback):
        def __init__(self):
            self.switched = False

        def on_step_begin(self, args, state, control, **kwargs):
            wanted = method.layers_for(state.global_step // method.interval_steps)
            if wanted != method.active or state.global_step == 0:
                method._set_layers(wanted)
                self.switched = True
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.switched and logs is not None:
                logs["active_layers"] = list(method.active)
                if args.world_size > 1:  # what every rank trains, so a divergence is visible in the metrics
                    logs["active_layers_by_rank"] = all_ranks(list(method.active))
                self.switched = False

    return LayerSwitcher()


def all_ranks(value) -> list:
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


Method = LISA  # the registry builds `Method` from `Options`
