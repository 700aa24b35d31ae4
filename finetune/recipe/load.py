"""Reading a recipe: YAML in, `--set` overrides applied, validated against the schema, and every problem raised at
once in one `UserError` (unknown keys with the nearest valid key, wrong types, out-of-range values, missing paths,
cross-field conflicts)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune.errors import UserError
from finetune.methods import METHODS
from finetune.recipe.schema import CROSS_CHECK_SEPARATOR, REGISTRIES, Recipe
from finetune.recipe.section import Section


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise one UserError listing every problem."""
    path = Path(path)
    raw = read_yaml(path)
    problems = []
    for override in overrides:
        try:
            apply_override(raw, override)
        except UserError as err:
            problems.append(str(err))
    _anchor_reward_files(raw, path.parent)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        for error in err.errors():
            if error["type"] == "value_error" and not error["loc"]:  # the cross-section checks, one per line
                problems.extend(str(error["ctx"]["error"]).split(CROSS_CHECK_SEPARATOR))
            else:
                problems.append(_describe(error))
    if problems:
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        raise UserError(f"{path}: {count}:\n" + "\n".join(f"  - {p}" for p in problems))
    return recipe


def _anchor_reward_files(raw: dict, folder: Path) -> None:
    """Reward files (`objective.rewards[].fn: path/to/file.py:function`) are named relative to the recipe, so a recipe
    and its rewards move together; made absolute here so the resolved recipe a run keeps reads the same anywhere."""
    objective = raw.get("objective")
    rewards = objective.get("rewards") if isinstance(objective, dict) else None
    for reward in rewards if isinstance(rewards, list) else []:
        fn = reward.get("fn") if isinstance(reward, dict) else None
        if isinstance(fn, str) and ".py:" in fn and not Path(fn.rsplit(":", 1)[0]).expanduser().is_absolute():
            file, name = fn.rsplit(":", 1)
            reward["fn"] = f"{(folder / file).resolve()}:{name}"


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"{path}: not valid YAML{line}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with sections model, data, method, train")
    return raw


def apply_override(raw: dict, override: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML, so numbers, booleans and lists work) to the raw mapping."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise UserError(f"--set {override!r}: expected dotted.key=value, e.g. train.learning_rate=1e-4")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {override!r}: `{part}` is not a section")
    node[leaf] = yaml.safe_load(value) if value.strip() else None


def _describe(error: dict) -> str:
    loc = list(error["loc"])
    # Drop the discriminator tag pydantic inserts into method locations ("method.lora.r" -> "method.r").
    registry = REGISTRIES.get(loc[0]) if loc else None
    if len(loc) > 1 and registry is not None and loc[1] in registry:
        tag = loc.pop(1)
    else:
        tag = None
    names = list(registry or METHODS)
    where = ".".join(str(p) for p in loc) or "recipe"
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = _field_names(loc[:-1], tag)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(valid)}"
        return f"{where}: unknown key{hint}"
    if kind == "union_tag_invalid":
        given = error["ctx"]["tag"]
        close = difflib.get_close_matches(str(given), names, n=1, cutoff=0.5)
        hint = f"did you mean `{close[0]}`?" if close else f"choose one of {', '.join(names)}"
        return f"{where}.name: unknown {loc[0] if registry else 'method'} `{given}`; {hint}"
    if kind == "union_tag_not_found":
        return f"{where}.name: missing; choose one of {', '.join(names)}"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "missing":
        return f"{where}: required field is missing"
    got = error.get("input")
    shown = "" if kind == "value_error" or isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{where}: {message}{shown}"


def _field_names(loc: list, tag: str | None) -> list[str]:
    model = Recipe
    for part in loc:
        if model is Recipe and part in REGISTRIES:
            model = REGISTRIES[part][tag].Options if tag in REGISTRIES[part] else None
        else:
            annotation = model.model_fields[part].annotation if model else None
            model = annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None
        if model is None:
            return []
    return list(model.model_fields)
