"""finetune: fine-tune causal language models from strict YAML recipes."""

__version__ = "0.1.0"
