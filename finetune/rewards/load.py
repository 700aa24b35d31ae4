"""Reward functions from their recipe entries: the built-ins by name, the user's own from a file or a module, each
wrapped so that whatever goes wrong inside it, or in what it returns, stops the run with a message naming the
function and the row rather than a traceback from inside TRL."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import traceback
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.rewards.base import PASSED_BY_TRAINER, RewardFn, RowProblem
from finetune.rewards.registry import REWARDS
from finetune.rewards.spec import RewardSpec

#: The shape TRL calls a reward with (every argument by keyword).
EXPECTED_SHAPE = "def fn(prompts, completions, **kwargs)"


class Reward:
    """One reward function of the run, as TRL's GRPOTrainer calls it. Its output is checked at every call: one real,
    finite number (or None: not scored) per completion. Booleans are accepted as 1.0 and 0.0 (a check's result is
    a natural reward); everything is returned as float so TRL's tensor sees no numpy scalars."""

    def __init__(self, name: str, spec: RewardSpec, fn: RewardFn, columns: dict[str, str | None]):
        self.name = self.__name__ = name  # TRL logs `rewards/<__name__>/mean`
        self.weight = spec.weight
        self.spec = spec
        self.fn = fn
        #: The row columns it reads, each with the option that names it (None: a parameter of a user function).
        self.columns = columns

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, fn={self.spec.fn!r}, weight={self.weight})"

    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
        try:
            values = self.fn(prompts=prompts, completions=completions, **kwargs)
        except RowProblem as err:
            raise UserError(f"reward `{self.spec.fn}` on {_row(kwargs, err.index)}: {err}") from None
        except Exception as err:
            raise UserError(f"reward `{self.spec.fn}` raised {type(err).__name__}: {err}{_where(err)}, scoring "
                            f"{_rows(kwargs, len(completions))}; fix the function (`finetune validate` calls it on "
                            "the first rows)") from None
        return self._checked(values, len(completions), kwargs)

    def _checked(self, values: Any, count: int, kwargs: dict) -> list[float | None]:
        fn = self.spec.fn
        if not isinstance(values, (list, tuple)):
            raise UserError(f"reward `{fn}` returned a {type(values).__name__} scoring {_rows(kwargs, count)}; it must "
                            "return a list with one number (or None) per completion (`.tolist()` an array)")
        if len(values) != count:
            raise UserError(f"reward `{fn}` returned {len(values)} values for {count} completions, scoring "
                            f"{_rows(kwargs, count)}; return one per completion, in the order given")
        checked: list[float | None] = []
        for i, value in enumerate(values):
            if value is not None and not isinstance(value, numbers.Real):
                raise UserError(f"reward `{fn}` returned {value!r} (a {type(value).__name__}) for {_row(kwargs, i)}; "
                                "each value must be a number, or None where the reward does not apply")
            if value is not None and not math.isfinite(value):
                raise UserError(f"reward `{fn}` returned {value} for {_row(kwargs, i)}; each value must be a finite "
                                "number (None marks a completion the reward does not apply to)")
            checked.append(None if value is None else float(value))
        return checked


def build_rewards(specs: list[RewardSpec], recipe_dir: Path) -> list[Reward]:
    """The recipe's rewards, ready for TRL, named for its logs: a built-in by its name, a user function as
    `file.py:function` or `module:function`; a name used twice gets `_2`, `_3`, ..."""
    rewards, taken = [], set()
    for spec in specs:
        if spec.is_builtin:
            builtin = REWARDS[spec.fn]
            options = builtin.options.model_validate(spec.options)
            name, fn, columns = spec.fn, builtin.build(options), dict(options.columns())
        else:
            target, _, attr = spec.fn.rpartition(":")
            fn, columns = load_function(spec, Path(recipe_dir))
            name = f"{Path(target).name if _is_file(target) else target}:{attr}"
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}_{n}"
        taken.add(unique)
        rewards.append(Reward(unique, spec, fn, columns))
    return rewards


def load_function(spec: RewardSpec, recipe_dir: Path) -> tuple[RewardFn, dict[str, None]]:
    """A user's reward function, its options bound, and the row columns its required parameters must come from."""
    target, _, attr = spec.fn.rpartition(":")
    if _is_file(target):
        path = Path(target).expanduser()
        path = (path if path.is_absolute() else recipe_dir / path).resolve()
        module, where = _module_from_file(spec.fn, path), str(path)
    else:
        module, where = _module_by_name(spec.fn, target), f"module {target}"
    if not hasattr(module, attr):
        defined = [n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                   and getattr(v, "__module__", None) == module.__name__]
        found = f"it defines {', '.join(defined[:6])}" if defined else "it defines no public function"
        raise UserError(f"reward `{spec.fn}`: {where} has no `{attr}`; {found}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise UserError(f"reward `{spec.fn}`: `{attr}` in {where} is a {type(fn).__name__}, not a function")
    columns = _signature_columns(spec, fn)
    return (functools.partial(fn, **spec.options) if spec.options else fn), columns


def _signature_columns(spec: RewardSpec, fn: Any) -> dict[str, None]:
    """The required parameters that can only come from row columns; a UserError when TRL's call cannot fit."""
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(fn.__call__):
        raise UserError(f"reward `{spec.fn}` is async; finetune calls rewards synchronously: make it a plain "
                        f"`{EXPECTED_SHAPE}`")
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as err:
        raise UserError(f"reward `{spec.fn}`: its signature cannot be read ({err}); wrap it in "
                        f"`{EXPECTED_SHAPE}`") from None
    by_keyword = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    problems = []
    if not any(p.kind == p.VAR_KEYWORD for p in parameters):  # **kwargs would take prompts and completions too
        problems.append("it takes no **kwargs, but TRL passes every row column and its own arguments (completion_ids, "
                        "trainer_state, ...) by keyword")
        missing = [name for name in ("prompts", "completions") if name not in by_keyword]
        if missing:
            problems.append(f"it has no parameter {' or '.join(f'`{m}`' for m in missing)}, which TRL passes by name")
    positional = [p.name for p in parameters if p.kind == p.POSITIONAL_ONLY and p.default is p.empty]
    if positional:
        problems.append(f"parameter `{positional[0]}` is positional-only; TRL passes everything by keyword")
    if problems:
        raise UserError(f"reward `{spec.fn}`: " + "; ".join(problems) + f"; the shape expected is `{EXPECTED_SHAPE}`")
    given = set(PASSED_BY_TRAINER) | set(spec.options)
    return {p.name: None for p in parameters if p.name in by_keyword and p.default is p.empty and p.name not in given}


def _module_from_file(fn: str, path: Path):
    if not path.is_file():
        raise UserError(f"reward `{fn}`: file {path} not found (a relative path is read from the recipe's folder)")
    # Registered in sys.modules under a name of its own (two recipes' reward.py must not collide), as an import
    # would: dataclasses and pickling look a function's module up there. Executed afresh at every build, so an
    # edited file is read again in a long-lived process.
    name = f"finetune_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"reward `{fn}`: {path} cannot be loaded as Python; give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        del sys.modules[name]
        raise UserError(f"reward `{fn}`: {err.filename or path} has a syntax error at line {err.lineno}: "
                        f"{err.msg}") from None
    except (Exception, SystemExit) as err:
        del sys.modules[name]
        raise UserError(f"reward `{fn}`: importing {path} raised {type(err).__name__}: {err}{_where(err)}") from None
    return module


def _module_by_name(fn: str, target: str):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as err:
        if err.name and (target == err.name or target.startswith(err.name + ".")):
            raise UserError(f"reward `{fn}`: no module named `{err.name}` in this environment; install it, or name a "
                            "file as `path/to/file.py:function`") from None
        raise UserError(f"reward `{fn}`: importing module {target} raised {type(err).__name__}: {err}") from None
    except SyntaxError as err:
        raise UserError(f"reward `{fn}`: module {target} has a syntax error in {err.filename} at line {err.lineno}: "
                        f"{err.msg}") from None
    except (Exception, SystemExit) as err:
        raise UserError(f"reward `{fn}`: importing module {target} raised {type(err).__name__}: {err}"
                        f"{_where(err)}") from None


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _where(err: BaseException) -> str:
    """Where the exception was raised (the innermost frame), since the user's traceback is not shown."""
    frames = traceback.extract_tb(err.__traceback__)
    return f" (at {Path(frames[-1].filename).name} line {frames[-1].lineno})" if frames else ""


def _row(kwargs: dict, index: int) -> str:
    rows = kwargs.get("source_row")
    if isinstance(rows, (list, tuple)) and index < len(rows):
        return f"completion {index} (row {rows[index]})"
    return f"completion {index}"


def _rows(kwargs: dict, count: int) -> str:
    rows = kwargs.get("source_row")
    if not isinstance(rows, (list, tuple)) or not rows:
        return f"{count} completions"
    distinct = list(dict.fromkeys(str(r) for r in rows))
    more = f" and {len(distinct) - 3} more" if len(distinct) > 3 else ""
    return f"{count} completions of row{'s' if len(distinct) > 1 else ''} {', '.join(distinct[:3])}{more}"
