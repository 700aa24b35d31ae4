"""What a recipe of raw text (data.format text, .txt/.md files) decides before any data is read: packing on by
default when every training source is text, and the objectives that cannot train on it."""

from __future__ import annotations

from pathlib import Path

from finetune.data.sources import TEXT_SUFFIXES, folder_listing
from finetune.errors import UserError


def known_text(path: str, format: str) -> bool:
    """Whether a source is raw text from the recipe alone: its format says so, or every file it names is .txt/.md (a
    JSON Lines file with a lone `text` field is detected only when it is read)."""
    if format != "auto":
        return format == "text"
    try:
        files = folder_listing(path)
    except UserError:  # the source's own validation reports it
        return False
    names = files.files if files is not None else [Path(path)]
    return bool(names) and all(name.suffix.lower() in TEXT_SUFFIXES for name in names)


def text_problems(recipe) -> list[str]:
    """Text sources with an objective that needs prompts and answers; and, for a recipe whose every training source
    is text, `train.packing` turned on unless the recipe sets it (documents are packed, none attending to another)."""
    d = recipe.data
    known = [known_text(s.path, s.format) for s in d.train_sources()]
    if not any(known):
        return []
    if recipe.objective.data_kind != "conversations":
        return [f"raw text (data.format text, .txt/.md files) trains with objective sft only: "
                f"{recipe.objective.name} needs prompts and answers"]
    if all(known) and not d.streaming and "packing" not in recipe.train.model_fields_set:
        recipe.train = recipe.train.model_copy(update={"packing": True})  # the default instance is shared
    return []
