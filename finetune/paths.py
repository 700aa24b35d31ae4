"""Where finetune keeps what it makes once and reuses: converted models, prepared data, built wheels."""

from __future__ import annotations

import os
from pathlib import Path

#: The file that makes a directory a finetune run directory (written when the run dir is claimed, before anything
#: else): what every command recognises a run by, since the other files of a run may be missing or removed.
RUN_INFO = "run.json"


def cache_dir() -> Path:
    """`$FINETUNE_CACHE`, else ~/.cache/finetune (the XDG cache folder most ML tools share)."""
    return Path(os.environ.get("FINETUNE_CACHE", "~/.cache/finetune")).expanduser()

#: The file inside an output directory that finetune is still writing (a merged model, an export's scratch): its
#: presence marks the directory partial, and it names the command that finishes or replaces it. Directories are
#: written under a temporary sibling name and renamed into place when complete, so only a killed command leaves one.
PARTIAL_MARKER = "finetune-partial.json"
