"""LoRA (and QLoRA: LoRA over a 4-bit or 8-bit quantized base) through peft."""

from __future__ import annotations

import os
import re
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from finetune.errors import UserError
from finetune.methods import base


class Options(base.MethodOptions):
    """LoRA: train low-rank adapters on a frozen base; `quantize` makes it QLoRA."""

    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    """Adapter rank. 8 is enough for instruction tuning at a few MB per adapter (the LoRA paper, arXiv 2106.09685,
    finds ranks 4-8 match higher ones)."""
    alpha: float = Field(32, gt=0)
    """Scaling numerator (the update is scaled by alpha / r); 32 with r=8 scales it by 4."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input; 0.05 is peft's common default for small instruction sets."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """Which linear layers get adapters: `all-linear` (every linear but the head) or module-name suffixes."""
    quantize: Literal["none", "4bit", "8bit"] = "none"
    """Quantize the frozen base with bitsandbytes (QLoRA). Needs a CUDA GPU."""
    use_dora: bool = False
    """DoRA (arXiv:2402.09353): each adapted weight split into a magnitude vector (trained too) and a direction the
    adapter updates; closer to full fine-tuning at low rank, for a slower step."""
    use_rslora: bool = False
    """rsLoRA (arXiv:2312.03732): scale the update by alpha / sqrt(r) instead of alpha / r, so that high ranks keep
    learning instead of being damped."""
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    """How adapters start. `default`: A random, B zero (the update starts at 0). `gaussian`: A Gaussian-scaled by
    rank. `pissa` (arXiv:2404.02948): from the base weights' principal singular vectors, which converges faster;
    `olora` (arXiv:2406.01775): from a QR decomposition of them. Both move that part out of the base, so the saved
    adapter is converted to a plain LoRA of the original base (peft's weight conversion, twice the rank). `loftq`
    (arXiv:2310.08659, for a quantized base) is not supported yet."""
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    """LoRA+ (arXiv:2402.12354): B's learning rate is this times A's (peft's create_loraplus_optimizer); the paper
    suggests 16. Unset: one learning rate for both."""
    modules_to_save: list[str] = []
    """Modules trained in full and saved with the adapter (e.g. `lm_head`, `embed_tokens` for a new vocabulary)."""

    @model_validator(mode="after")
    def _supported_init(self):
        if self.init == "loftq" and self.quantize != "4bit":
            raise ValueError("method.init loftq corrects 4-bit quantization error: it needs `quantize: 4bit`")
        if self.init in ("pissa", "olora") and self.quantize != "none":
            raise ValueError(f"method.init {self.init} changes the base weights, which a quantized base cannot "
                             "take; use it with `quantize: none`")
        return self

    def strategy_problem(self, strategy, zero_stage):
        if self.quantize != "none" and strategy == "fsdp":
            return ("method lora with quantize (QLoRA) and strategy fsdp: FSDP2, the FSDP of the installed "
                    "transformers, cannot shard bitsandbytes' quantized weights (FSDP1 could, and is deprecated). "
                    "Use `distributed.strategy: ddp` (each GPU holds the whole quantized base: ~4 GiB for 7B) or "
                    "LoRA without `quantize` under fsdp")
        if self.quantize != "none" and strategy == "deepspeed" and (zero_stage or 2) == 3:
            return ("method lora with quantize (QLoRA) and ZeRO-3: ZeRO-3 partitions weights and the quantized "
                    "base cannot be partitioned. Use `zero_stage: 2` or `strategy: ddp`")
        return None

    head_trains: ClassVar[bool] = False
    steps_in_backward: ClassVar[bool] = True  # the optimizer step over the adapters is small

    def planned_trainable(self, model):
        trainable = {f"{n}.lora": self.r * (m.in_features + m.out_features) + (m.out_features if self.use_dora else 0)
                     for n, m in lora_targets(model, self)}  # DoRA adds a magnitude per output feature
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in self.modules_to_save:
                trainable[f"{name}.saved"] = sum(p.numel() for p in module.parameters())
        return trainable

    def planned_rows(self, model, trainable, setup):
        import torch

        adapter = sum(trainable.values())
        # peft keeps adapters in fp32 over a bf16 base (autocast_adapter_dtype): weights, grads, AdamW moments
        rows = {"lora adapters": adapter * 4, "gradients": adapter * 4, "optimizer states": 2 * adapter * 4}
        if self.quantize != "none":
            # bitsandbytes quantizes every linear but the head. NF4 with double quantization: 4 bits plus an 8-bit
            # scale per 64 values plus an fp32 scale per 256 scales; LLM.int8: a byte plus an fp32 scale per row.
            head = model.get_output_embeddings()
            linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
            count = sum(m.weight.numel() for m in linear)
            quantized = count * (0.5 + 1 / 64 + 4 / (64 * 256)) if self.quantize == "4bit" else \
                count + 4 * sum(m.out_features for m in linear)
            rows["weights"] = sum(p.numel() for p in model.parameters()) * setup.weight_bytes + quantized - \
                count * setup.weight_bytes
        return rows

    def planned_adapted_layers(self, model):
        return sum(1 for _ in lora_targets(model, self))

    def planned_activation_bytes(self, model, setup):
        """peft casts each adapted layer's input to the adapter's fp32 and applies dropout to it, and the adapter's
        backward keeps the result: a copy per adapted layer unless the input is fp32 already and dropout is 0 (an
        identity). Under checkpointing only the recomputed layer's copies."""
        if self.dropout == 0 and setup.weight_bytes == 4:
            return 0.0
        from finetune.methods.lisa import decoder_layers

        inputs = sum(module.in_features for _, module in lora_targets(model, self))
        kept = inputs / len(decoder_layers(model)[1]) if setup.checkpointing else inputs
        return setup.seq_len * setup.batch * setup.sequences * kept * 4  # adapters and their inputs are fp32

    @classmethod
    def plan_alternatives(cls, like):
        r = getattr(like, "r", 8)
        return {f"LoRA r={r}": cls(r=r), f"QLoRA 4-bit r={r}": cls(r=r, quantize="4bit")}

    @classmethod
    def memory_savers(cls):
        return [(3, cls(), "method.name: lora"),
                (4, cls(quantize="4bit"), "method.name: lora with quantize: 4bit (QLoRA)")]


def lora_targets(model, options):
    """The (name, module) pairs peft puts adapters on: every Linear but the head, or the named ones. In a
    vision-language model `all-linear` and bare layer names mean the language model's layers; a name of a part beside
    it (`visual`, `vision_model`, `multi_modal_projector`, `connector`, `merger`) adapts every Linear inside that
    part, and a dotted path names one layer there."""
    import torch

    from finetune.models.vision import language_model_filter

    head, in_language_model = model.get_output_embeddings(), language_model_filter(model)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if in_language_model(name):
            if options.target_modules == "all-linear" or any(name == t or name.endswith(f".{t}")
                                                            for t in options.target_modules):
                yield name, module
        elif options.target_modules != "all-linear" and any(_names_part(name, t) for t in options.target_modules):
            yield name, module


def _names_part(name: str, target: str) -> bool:
    """Whether `target` names a part that holds the Linear `name` (`connector`, `vision_model.encoder`) or the
    layer itself by a dotted path (`vision_model.encoder.layers.0.self_attn.q_proj`), not a bare layer name."""
    holder = f".{name.rpartition('.')[0]}."
    return f".{target}." in holder or ("." in target and (name == target or name.endswith(f".{target}")))


def peft_target_modules(model, options):
    """What peft is told to adapt. peft's own `all-linear` and name suffixes would reach into a vision tower (whose
    attention layers share the language model's names), so a vision-language model gets the layers lora_targets
    picks, as one pattern (layer indices folded into `\\d+`, which keeps adapter_config.json short)."""
    from finetune.models.vision import language_prefix

    if not language_prefix(model):
        return options.target_modules
    names = [name for name, _ in lora_targets(model, options)]
    if not names:
        raise UserError(f"method.target_modules {options.target_modules}: no Linear layer of this model matches")
    patterns = dict.fromkeys(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(name)) for name in names)
    return "^(?:" + "|".join(patterns) + ")$"


class LoRA(base.Method):
    name = "lora"
    artifact = "adapter"

    def __init__(self, r: int, alpha: float, dropout: float, target_modules, quantize: str, use_dora: bool = False,
                 use_rslora: bool = False, init: str = "default", loraplus_lr_ratio: float | None = None,
                 modules_to_save: list[str] = ()):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules, self.quantize = target_modules, quantize
        self.use_dora, self.use_rslora, self.init = use_dora, use_rslora, init
        self.loraplus_lr_ratio, self.modules_to_save = loraplus_lr_ratio, list(modules_to_save)
        self.initial_adapter: str | None = None  # pissa/olora: the adapter as initialised, for the conversion

    def load_kwargs(self):
        if self.quantize == "none":
            return {}
        import torch
        from transformers import BitsAndBytesConfig

        if not torch.cuda.is_available():
            raise UserError(
                f"method.quantize: {self.quantize} (QLoRA) needs a CUDA GPU with bitsandbytes, and none is "
                "available here. Set `method.quantize: none` to train plain LoRA on this machine."
            )
        # Each process loads the quantized base onto its own GPU (DDP: one whole copy per rank).
        placement = {"device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}
        if self.quantize == "8bit":
            return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), **placement}
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",  # NF4 + double quant: the QLoRA paper's setting
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            ),
            **placement,
        }

    def prepare(self, model, new_token_ids):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if self.quantize != "none":
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=False  # the trainer turns checkpointing on itself
            )
        token_rows, head = _new_token_training(model, new_token_ids)
        saved = sorted(set(head or []) | set(self.modules_to_save)) or None
        if token_rows and saved and set(token_rows) & set(saved):  # a module trained whole needs no row-wise part
            token_rows = {k: v for k, v in token_rows.items() if k not in saved} or None
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=peft_target_modules(model, self),
            task_type="CAUSAL_LM",
            trainable_token_indices=token_rows,
            modules_to_save=saved,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            init_lora_weights={"default": True, "loftq": True}.get(self.init, self.init),
        )
        model = get_peft_model(model, config)
        if self.init == "loftq":  # on the quantized model: its own init, from the unquantized safetensors weights
            from peft import replace_lora_weights_loftq

            replace_lora_weights_loftq(model)
        if self.init in ("pissa", "olora"):
            import tempfile

            # peft's conversion needs the adapter as initialised, saved before any step, marked as a plain init.
            self.initial_adapter = tempfile.mkdtemp(prefix="finetune-lora-init-")
            model.peft_config["default"].init_lora_weights = True
            model.save_pretrained(self.initial_adapter)
            model.peft_config["default"].init_lora_weights = self.init
        return model

    def optimizers(self, model, learning_rate, weight_decay, max_grad_norm):
        if self.loraplus_lr_ratio is None:
            return None
        import torch
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=learning_rate, weight_decay=weight_decay,
                                         loraplus_lr_ratio=self.loraplus_lr_ratio), None

    def save(self, trainer, path):
        trainer.save_model(str(path))
        if self.initial_adapter is not None and trainer.accelerator.is_main_process:
            # pissa/olora moved part of the base into the adapter: saved as is, the adapter only fits that changed
            # base. Converted, it is a plain LoRA (of twice the rank) of the original base that peft loads as any.
            model = trainer.accelerator.unwrap_model(trainer.model)
            model.save_pretrained(str(path), path_initial_model_for_weight_conversion=self.initial_adapter)


def _new_token_training(model, token_ids: list[int]):
    """What must train so that tokens added for ChatML become usable: (trainable_token_indices, modules_to_save).

    Their embedding rows start as the mean embedding; frozen, the model could neither read nor emit them. peft
    trains just those rows of the input embedding. An untied head cannot be row-wrapped by peft, and its
    `<|im_end|>` row is what lets the model stop, so the whole head trains then.
    """
    if not token_ids:
        return None, None
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {m: name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
    untied_head = head is not None and head.weight is not embeddings.weight
    return {names[embeddings]: list(token_ids)}, [names[head]] if untied_head else None


Method = LoRA  # the registry builds `Method` from `Options`
