"""A per-parameter optimizer engine that can step inside the backward pass.

Every trainable parameter gets its own small optimizer (`ParamStepper`: AdamW or 8-bit AdamW, optionally over
a GaLore low-rank projection of the gradient). `LayerwiseOptimizer` presents them to the trainer as one
ordinary optimizer:

- layer-wise (`layerwise=True`): a `register_post_accumulate_grad_hook` per parameter steps that parameter
  and frees its gradient as soon as backward has produced it, so no full set of gradients is ever alive
  (with accumulation, gradients accumulate in `.grad` across micro-batches and each parameter steps once,
  in the backward of the last micro-batch);
- otherwise `step()` walks the steppers after backward, like any optimizer.

Peers (transformers' `*_layerwise` optimizers) refuse gradient accumulation, fake the LR scheduler, log a
grad norm of 0, and checkpoint no per-parameter state. Here:
- one parameter group faces the scheduler; each per-parameter optimizer takes its LR from that group when it
  steps, so one schedule drives them all and the logged LR is the one used (a single group also lets the
  set of steppers change, as LISA needs, without confusing the scheduler's per-group lists);
- the global gradient norm of the step is summed up from each parameter's final gradient, before clipping;
- clipping in layer-wise mode is per parameter (each parameter's gradient norm is capped at max_grad_norm):
  the global norm is only known once every parameter has already stepped. Non-layer-wise mode leaves
  clipping to the trainer (true global clipping);
- `state_dict` holds every inner optimizer state and every projection matrix, keyed by parameter name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from finetune.optim.galore import Projector, low_rank_shape


def _adamw(params, lr: float, weight_decay: float, bits: int) -> torch.optim.Optimizer:
    if bits == 8:
        return _chunked_adamw8bit()(params, lr=lr, weight_decay=weight_decay)
    # torch's default for a single tensor is its per-tensor loop of ~10 elementwise passes with two tensor-sized
    # fp32 temporaries; the fused kernel makes one pass and no temporaries (on CPU it is several times faster).
    fused = all(p.device.type in FUSED_DEVICES and p.dtype in FUSED_DTYPES for p in params) or None
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


#: Where torch's fused AdamW kernel exists (elsewhere, e.g. on MPS or for float64, AdamW's default loop runs).
FUSED_DEVICES, FUSED_DTYPES = ("cpu", "cuda"), (torch.float32, torch.float16, torch.bfloat16)


#: Elements per chunk of bitsandbytes' CPU 8-bit update: a multiple of its 256-value quantization block.
CHUNK = 256 * 4096


def _chunked_adamw8bit():
    """bitsandbytes' AdamW8bit, but on CPU the update runs over block-aligned chunks of the tensor.

    Its CPU kernel dequantizes both moments of the whole tensor to fp32 and makes a few more full-size
    temporaries (about 24 bytes per value: 0.6 GiB for SmolLM2's 28M-value embedding), which defeats the point
    of 8-bit states. Blockwise quantization is independent per 256-value block, so chunked updates give
    bit-identical results with ~24 MB of temporaries. CUDA keeps bitsandbytes' fused kernel untouched.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    class ChunkedAdamW8bit(bnb.optim.AdamW8bit):
        @torch.no_grad()
        def update_step(self, group, p, gindex, pindex):
            state = self.state[p]
            if p.device.type != "cpu" or state["state1"].dtype != torch.uint8 or p.numel() <= CHUNK:
                return super().update_step(group, p, gindex, pindex)
            p.data, p.grad = p.data.contiguous(), p.grad.contiguous()
            config = self.get_config(gindex, pindex, group)
            state["step"] += 1
            flat = [t.view(-1) for t in (p.grad, p.data, state["state1"], state["state2"])]
            for start in range(0, p.numel(), CHUNK):
                end = min(start + CHUNK, p.numel())
                blocks = slice(start // 256, -(-end // 256))
                grad, param, state1, state2 = (t[start:end] for t in flat)
                F.optimizer_update_8bit_blockwise(
                    self.optimizer_name, grad, param, state1, state2, config["betas"][0], config["betas"][1],
                    0.0, 0.0, config["eps"], state["step"], config["lr"], state["qmap1"], state["qmap2"],
                    state["absmax1"][blocks], state["absmax2"][blocks], config["weight_decay"], gnorm_scale=1.0,
                    skip_zeros=config["skip_zeros"],
                )

    return ChunkedAdamW8bit


class ParamStepper:
    """One parameter's optimizer.

    Without a projector the inner AdamW works on the parameter itself. With one, it works on a low-rank proxy
    `z`: each step sets z = 0 and z.grad = P^T G, so after the inner step z = -lr * AdamW-direction(P^T G),
    and the weight moves by P z (times GaLore's scale). The inner optimizer keeps its moments in the low-rank
    shape; no copy of the full weight is ever made (galore-torch's 8-bit optimizer clones every weight).
    z has storage only while its parameter steps (for Llama-2-7B at rank 1024 a resident z would cost ~3 GiB).
    Weight decay is applied to the full weight, decoupled, as AdamW does.
    """

    def __init__(self, param: torch.nn.Parameter, lr: float, weight_decay: float, bits: int,
                 projector: Projector | None = None):
        self.param, self.projector, self.weight_decay = param, projector, weight_decay
        self.steps = 0
        if projector is None:
            self.proxy = None
            self.inner = _adamw([param], lr, weight_decay, bits)
        else:
            self.proxy_shape = low_rank_shape(tuple(param.shape), projector.rank, projector.proj_type)
            self.proxy = torch.nn.Parameter(param.new_empty(0))  # storage only during step()
            self.inner = _adamw([self.proxy], lr, 0.0, bits)

    @torch.no_grad()
    def step(self, lr: float, max_grad_norm: float = 0.0, grad: torch.Tensor | None = None,
             measure: bool = True) -> torch.Tensor | None:
        """Step on `grad` (default: the parameter's .grad) at this LR; return its squared norm before clipping
        (a 0-d tensor on the gradient's device, or None when not `measure`d and not clipping).

        The norm stays a tensor and clipping scales by a tensor factor, so stepping inside backward never waits
        on the GPU per parameter (a `.item()` here would synchronise once per parameter)."""
        for group in self.inner.param_groups:
            group["lr"] = lr
        if grad is not None:
            self.param.grad = grad
        grad = self.param.grad
        squared = None
        if measure or max_grad_norm > 0:
            squared = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        if max_grad_norm > 0:
            factor = (max_grad_norm / squared.sqrt()).clamp(max=1.0)  # a norm within the cap is scaled by 1
            # On CPU reading the factor waits for nothing, and skipping the scale by 1 spares a pass over the gradient.
            if grad.device.type != "cpu" or factor.item() < 1.0:
                grad.mul_(factor)
        if self.projector is None:
            self.inner.step()
        else:
            self.proxy.data = self.param.new_zeros(self.proxy_shape)
            self.proxy.grad = self.projector.project(grad, self.steps).to(self.proxy.dtype)
            self.inner.step()
            self.proxy.grad = None
            if self.weight_decay:
                self.param.mul_(1 - lr * self.weight_decay)
            self.projector.add_projected_back(self.param, self.proxy)
            self.proxy.data = self.param.new_empty(0)
        self.steps += 1
        return squared

    def state_dict(self) -> dict:
        state = {"inner": self.inner.state_dict(), "steps": self.steps}
        if self.projector is not None:
            state["projector"] = self.projector.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.steps = state["steps"]
        if self.projector is not None:
            self.projector.load_state_dict(state["projector"])


def _trainer_sync_state() -> bool:
    """True during the backward of the last micro-batch of an optimizer step (set by the HF Trainer)."""
    from accelerate.state import GradientState

    return GradientState().sync_gradients


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Many per-parameter optimizers behind one optimizer interface (see the module docstring)."""

    def __init__(self, steppers: dict[str, ParamStepper], lr: float, layerwise: bool, max_grad_norm: float = 0.0,
                 is_last_micro_batch: Callable[[], bool] = _trainer_sync_state,
                 method_state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None):
        """`method_state`: (save, restore) for a method's own state in checkpoints; restore runs before the
        steppers' states load, so a method can first recreate the steppers the checkpoint has (LISA)."""
        self.layerwise = layerwise
        self.under_ddp = False  # set by step_after_allreduce: DDP's communication hook steps, not grad hooks
        self.method_state = method_state
        self.max_grad_norm = max_grad_norm if layerwise else 0.0  # non-layer-wise: the trainer clips globally
        self.is_last_micro_batch = is_last_micro_batch
        # The step's summed squared gradient norms, one running 0-d tensor per device, zeroed (not replaced) each
        # step: a tensor kept per parameter would pin small heap blocks among the freed gradients, and on CPU the
        # heap then cannot shrink (`benchmarks/bench.py` showed the higher peak for 8-bit layer-wise full training).
        self._squared_norms: dict[torch.device, torch.Tensor] = {}
        super().__init__([s.param for s in steppers.values()], {"lr": lr})
        self.steppers: dict[str, ParamStepper] = {}
        self._by_param: dict[int, ParamStepper] = {}  # id(param) -> stepper, for DDP buckets (which hold params)
        self._hooks: dict[str, object] = {}
        for name, stepper in steppers.items():
            self.add_stepper(name, stepper)

    def add_stepper(self, name: str, stepper: ParamStepper) -> None:
        self.steppers[name] = stepper
        self._by_param[id(stepper.param)] = stepper
        if self.layerwise and not self.under_ddp:
            self._hooks[name] = stepper.param.register_post_accumulate_grad_hook(self._hook(stepper))

    def remove_stepper(self, name: str) -> ParamStepper:
        """Forget a parameter: its hook, its gradient and its optimizer state go (the memory is released)."""
        stepper = self.steppers.pop(name)
        del self._by_param[id(stepper.param)]
        hook = self._hooks.pop(name, None)
        if hook is not None:
            hook.remove()
        stepper.param.grad = None
        return stepper

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    #: The trainer asks this to log (and not to recompute from .grad, which layer-wise mode has freed).
    @property
    def steps_in_backward(self) -> bool:
        return self.layerwise

    def _hook(self, stepper: ParamStepper):
        def step_now(param: torch.Tensor) -> None:
            if self.is_last_micro_batch():
                self._add_squared_norm(stepper.step(self.lr, self.max_grad_norm))
                param.grad = None  # freed as soon as it is used: no full set of gradients at once

        return step_now

    def step_after_allreduce(self, ddp_model) -> None:
        """Step layer-wise under DDP, on gradients averaged over every rank.

        A post-accumulate-grad hook fires before DDP has all-reduced that gradient, so stepping there would let
        the replicas drift apart (the reason peers refuse layer-wise optimizers under DDP). Instead we chain onto
        DDP's own communication hook, as PyTorch's optimizer-overlap hooks do: when a bucket's all-reduce
        completes, its parameters step on the averaged gradients while backward goes on. During accumulation
        DDP's `no_sync` reduces nothing, so gradients accumulate locally and each parameter steps once, on the last
        micro-batch. DDP keeps its own gradient buckets for every parameter, so under DDP the saving is the
        optimizer step overlapped with backward, not gradient memory.
        """
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
            allreduce_hook,
        )

        for hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()
        self.under_ddp = True

        def reduce_then_step(process_group, bucket):
            def step_bucket(future):
                for param, grad in zip(bucket.parameters(), bucket.gradients()):
                    stepper = self._by_param.get(id(param))  # None: a parameter LISA has frozen
                    if stepper is not None:
                        self._add_squared_norm(stepper.step(self.lr, self.max_grad_norm, grad=grad))
                        param.grad = None
                return bucket.buffer()

            return allreduce_hook(process_group, bucket).then(step_bucket)

        ddp_model.register_comm_hook(None, reduce_then_step)

    def step_grad_norm(self) -> float:
        """Global gradient norm of the step in progress (layer-wise: all hooks of the step have run)."""
        return math.sqrt(sum(total.item() for total in self._squared_norms.values()))

    def _add_squared_norm(self, squared: torch.Tensor) -> None:
        total = self._squared_norms.get(squared.device)
        if total is None:
            self._squared_norms[squared.device] = squared.clone()
        else:
            total.add_(squared)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        if not self.layerwise:
            for stepper in self.steppers.values():
                if stepper.param.grad is not None:
                    stepper.step(self.lr, measure=False)  # the trainer has measured and clipped globally
        for total in self._squared_norms.values():
            total.zero_()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for stepper in self.steppers.values():
            stepper.param.grad = None

    def state_dict(self) -> dict:
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}  # lr, initial_lr
        state = {"group": group, "steppers": {name: s.state_dict() for name, s in self.steppers.items()}}
        if self.method_state is not None:
            state["method"] = self.method_state[0]()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if self.method_state is not None:
            self.method_state[1](state_dict["method"])
        missing = self.steppers.keys() - state_dict["steppers"].keys()
        if missing:
            raise ValueError(f"optimizer checkpoint lacks state for {len(missing)} parameters, e.g. {min(missing)}")
        for name, stepper in self.steppers.items():
            stepper.load_state_dict(state_dict["steppers"][name])
        self.param_groups[0].update(state_dict["group"])


def new_stepper(param: torch.nn.Parameter, lr: float, weight_decay: float, bits: int,
                projector: Projector | None = None) -> ParamStepper:
    """A stepper with no weight decay on biases and norms (1-D parameters), as transformers' default optimizer
    grouping does."""
    return ParamStepper(param, lr, weight_decay if param.ndim >= 2 else 0.0, bits, projector)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, bits: int, layerwise: bool,
                    max_grad_norm: float = 0.0, projector_for: Callable[[str, torch.nn.Parameter], Projector | None]
                    = lambda name, param: None, **kwargs) -> LayerwiseOptimizer:
    """A stepper for every trainable parameter; `projector_for` decides which get GaLore."""
    steppers = {name: new_stepper(param, lr, weight_decay, bits, projector_for(name, param))
                for name, param in model.named_parameters() if param.requires_grad}
    return LayerwiseOptimizer(steppers, lr, layerwise, max_grad_norm, **kwargs)
