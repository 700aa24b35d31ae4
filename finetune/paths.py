"""Where finetune keeps what it makes once and reuses: converted models, prepared data, built wheels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$FINETUNE_CACHE`, else ~/.cache/finetune (the XDG cache folder most ML tools share)."""
    return Path(os.environ.get("FINETUNE_CACHE", "~/.cache/finetune")).expanduser()
