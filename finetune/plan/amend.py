"""Write the fitter's changes into a copy of the user's recipe, keeping everything else as the user wrote it.

A line editor rather than load-modify-dump: PyYAML drops comments, blank lines and flow/quoting choices on a round
trip, and the recipe's comments are the user's reasoning. It understands block-style mappings (any consistent
indentation), which is what recipes are; anything it cannot edit safely (a flow mapping, a list where a section
should be) is refused with a ValueError naming the key rather than guessed at.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import yaml

_KEY = re.compile(r"( *)([A-Za-z0-9_][\w.\-]*)[ \t]*:(?:[ \t]+(.*))?$")
_BLOCK_SCALAR = re.compile(r"(?:^|\s)[|>][-+1-9]*$")  # a `|` or `>` header, e.g. `key: |-` or `- >`


@dataclass(frozen=True)
class Change:
    key: str  # dotted recipe key, e.g. "train.batch_size"
    value: object  # int, float, bool, str, None, a list of scalars, or a mapping that replaces a whole section
    reason: str  # short text, goes into the comment


@dataclass
class _Key:
    name: str | None  # None: a key this editor does not parse (quoted, complex); it still bounds its neighbours
    line: int  # index of the "name:" line
    indent: int
    value: str  # the inline value, its comment stripped
    end: int  # one past the last line of the value


def amend_recipe(text: str, changes: list[Change], note: str = "finetune plan --fit") -> str:
    """The recipe text with each change applied on its own line, everything else byte-for-byte the same."""
    # Re-scanning after each change keeps every change's line numbers honest at the cost of a few ms.
    for change in changes:
        text = _apply(text, change, note)
    return text


def _apply(text: str, change: Change, note: str) -> str:
    lines = text.splitlines(keepends=True)
    path = change.key.split(".")
    if not all(_KEY.fullmatch(f"{name}:") for name in path):
        raise ValueError(f"cannot set {change.key!r}: not a dotted recipe key")
    start, end, indent = 0, len(lines), -1
    for depth, name in enumerate(path):
        child, keys = _mapping(lines, start, end, change.key)
        found = [k for k in keys if k.name == name]
        if not found:
            return "".join(_insert(lines, path[depth:], end, indent, child, change, note, _unit(lines)))
        key = found[-1]  # YAML loaders keep the last of duplicate keys, so that is the one in effect
        if depth == len(path) - 1:
            return "".join(_replace(lines, key, change, note))
        if key.value:
            kind = "a flow mapping" if key.value.startswith("{") else f"not a block mapping ({key.value!r})"
            raise ValueError(f"cannot set {change.key}: {'.'.join(path[: depth + 1])} is {kind} in the recipe")
        start, end, indent = key.line + 1, key.end, key.indent
    raise AssertionError("unreachable")


def _mapping(lines: list[str], start: int, end: int, target: str) -> tuple[int | None, list[_Key]]:
    """The child indentation and keys of the block mapping in lines[start:end] (None, [] when it is empty)."""
    child, keys, scalar = None, [], None
    for i in range(start, end):
        body = lines[i].rstrip("\r\n")
        indent = _indent(body)
        if scalar is not None and (indent > scalar or not body.strip()):
            # Inside a block scalar, at any depth, a line that looks like a comment is text and belongs to its key.
            if body.strip():
                keys[-1].end = i + 1
            continue
        scalar = None
        if _skip(body):
            continue
        child = indent if child is None else child
        if indent < child:
            raise ValueError(f"cannot set {target}: unexpected indentation on recipe line {i + 1}")
        dash = indent == child and body[indent] == "-" and body[indent + 1 : indent + 2] in ("", " ")
        if dash and not (keys and keys[-1].value == ""):
            # A sequence may sit at its key's own indentation; anywhere else a dash means a list, not a mapping.
            raise ValueError(f"cannot set {target}: recipe line {i + 1} is a list item where a mapping was expected")
        if indent > child or dash:
            keys[-1].end = i + 1
        else:
            match = _KEY.match(body)
            value = _split_comment(match.group(3) or "")[0] if match else ""
            keys.append(_Key(match.group(2) if match else None, i, indent, value, i + 1))
        scalar = indent if _BLOCK_SCALAR.search(_split_comment(body.strip())[0]) else None
    return child, keys


def _replace(lines: list[str], key: _Key, change: Change, note: str) -> list[str]:
    if isinstance(change.value, dict):  # a whole section replaced (a method switch): written in block style
        ending = lines[key.end - 1][len(lines[key.end - 1].rstrip("\r\n")) :] or "\n"
        head = f"{' ' * key.indent}{key.name}:{_comment(note, change, _old_text(lines, key))}{ending}"
        indent = " " * (key.indent + _unit(lines))
        body = [f"{indent}{name}: {_format(value)}{ending}" for name, value in change.value.items()]
        return lines[: key.line] + [head, *body] + lines[key.end :]
    if key.value.startswith("{"):
        raise ValueError(f"cannot set {change.key}: its value is a flow mapping; only single settings are amended")
    if key.value.startswith("&"):
        raise ValueError(f"cannot set {change.key}: its value is an anchor that other keys may refer to")
    if not key.value and key.end > key.line + 1 and not lines[_first_row(lines, key)].lstrip().startswith("-"):
        raise ValueError(f"cannot set {change.key}: it is a section, not a single setting")
    old = _old_text(lines, key)
    ending = lines[key.end - 1][len(lines[key.end - 1].rstrip("\r\n")) :]
    new = f"{' ' * key.indent}{key.name}: {_format(change.value)}{_comment(note, change, old)}{ending}"
    return lines[: key.line] + [new] + lines[key.end :]


def _insert(lines: list[str], path: list[str], at: int, indent: int, child: int | None, change: Change, note: str,
            unit: int) -> list[str]:
    """Add the missing path under the mapping that ends before line `at` (the end of the file for the top level)."""
    at = len(lines) if indent < 0 else at
    base = child if child is not None else (0 if indent < 0 else indent + unit)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    lines = list(lines)
    if at and not lines[at - 1].endswith("\n"):
        lines[at - 1] += newline
    new = [f"{' ' * (base + j * unit)}{name}:{newline}" for j, name in enumerate(path[:-1])]
    value = f"{_format(change.value)}{_comment(note, change, 'unset')}"
    new.append(f"{' ' * (base + (len(path) - 1) * unit)}{path[-1]}: {value}{newline}")
    return lines[:at] + new + lines[at:]


def _old_text(lines: list[str], key: _Key) -> str:
    if key.end == key.line + 1:
        return key.value or "null"
    # Several lines (a block list or scalar): show what they meant, in the one-line form the new value uses.
    block = "".join(s[key.indent :] if s.strip() and _indent(s) >= key.indent else "\n"
                    for s in lines[key.line : key.end])
    try:
        return _format(yaml.safe_load(block)[key.name])
    except (yaml.YAMLError, ValueError, TypeError, KeyError):
        return "..."


def _format(value: object) -> str:
    """One line of YAML for a value, quoted only where a loader would otherwise read something else."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_dump([v])[1:-1] for v in value) + "]"
    if value is None or isinstance(value, (bool, int, float, str)):
        return _dump(value).removesuffix("...").strip()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_format(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write a {type(value).__name__} into a recipe: {value!r}")


def _dump(value: object) -> str:
    # Strings with newlines or tabs go double-quoted so they escape instead of folding onto further lines.
    items = value if isinstance(value, list) else [value]
    style = '"' if any(isinstance(v, str) and not v.isprintable() for v in items) else None
    dumped = yaml.safe_dump(value, default_flow_style=True, default_style=style, width=math.inf, allow_unicode=True)
    return dumped.strip()


def _comment(note: str, change: Change, old: str) -> str:
    return f"  # {note}: {' '.join(change.reason.split())} (was {old})"


def _split_comment(rest: str) -> tuple[str, str]:
    """The value and the trailing comment of a line's text after `key:`; a # inside quotes is not a comment."""
    quote, i = "", 0
    while i < len(rest):
        ch = rest[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"" and (i == 0 or rest[i - 1] in " \t[{,:"):
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[:i].rstrip(), rest[i:]
        i += 1
    return rest.rstrip(), ""


def _skip(line: str) -> bool:
    """Lines that hold no mapping content: blank, comments, document markers and directives."""
    stripped = line.strip()
    marker = line[:3] in ("---", "...") and line[3:4] in ("", " ", "\t", "\r", "\n")
    return not stripped or stripped.startswith("#") or marker or line.startswith("%")


def _first_row(lines: list[str], key: _Key) -> int:
    return next(i for i in range(key.line + 1, key.end) if not _skip(lines[i]))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _unit(lines: list[str]) -> int:
    """The file's indentation step (a section's first child less its key), for sections with no children to copy."""
    rows = [s.rstrip("\r\n") for s in lines if not _skip(s)]
    # List items are left out: YAML lets them sit at any depth under their key, so they say nothing about the step.
    steps = [_indent(b) - _indent(a) for a, b in zip(rows, rows[1:]) if (m := _KEY.match(a))
             and not _split_comment(m.group(3) or "")[0] and _indent(b) > _indent(a) and b.strip()[0] != "-"]
    return min(steps, default=2)
