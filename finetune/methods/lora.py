"""LoRA (and QLoRA: LoRA over a 4-bit or 8-bit quantized base) through peft."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from finetune.errors import UserError
from finetune.methods.base import Section


class Options(Section):
    """LoRA: train low-rank adapters on a frozen base; `quantize` makes it QLoRA."""

    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    """Adapter rank. 8 is the seed 001/003 setting: enough for instruction tuning at a few MB per adapter."""
    alpha: float = Field(32, gt=0)
    """Scaling numerator (update is scaled by alpha / r). 32 with r=8 as in seed 001/003."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input; 0.05 is peft's common default for small instruction sets."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """Which linear layers get adapters: `all-linear` (every linear but the head) or module-name suffixes."""
    quantize: Literal["none", "4bit", "8bit"] = "none"
    """Quantize the frozen base with bitsandbytes (QLoRA). Needs a CUDA GPU."""


class LoRA:
    name = "lora"
    artifact = "adapter"

    def __init__(self, r: int, alpha: float, dropout: float, target_modules, quantize: str):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules, self.quantize = target_modules, quantize

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
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type="CAUSAL_LM",
            trainable_token_indices=token_rows,
            modules_to_save=head,
        )
        return get_peft_model(model, config)

    def optimizers(self, model, learning_rate, weight_decay, max_grad_norm):
        return None

    def callbacks(self):
        return []


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


def build(r: int, alpha: float, dropout: float, target_modules, quantize: str) -> LoRA:
    return LoRA(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, quantize=quantize)
