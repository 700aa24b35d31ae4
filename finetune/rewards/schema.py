"""A small JSON Schema subset, for the `json` reward. jsonschema is not a dependency (and a reward needs only a yes or
no per completion), so the keywords below are implemented here; a schema with any other validation keyword is
refused up front rather than half-checked. Annotation keywords (title, description, ...) constrain nothing in JSON
Schema and are accepted: tool-call schemas carry them everywhere."""

from __future__ import annotations

import math
from typing import Any

#: What is checked, as JSON Schema (https://json-schema.org/draft/2020-12/json-schema-validation) defines it.
KEYWORDS = ("type", "properties", "required", "additionalProperties", "items", "enum", "const", "minItems",
            "maxItems", "minimum", "maximum", "minLength", "maxLength", "anyOf")
ANNOTATIONS = ("title", "description", "$schema", "$id", "$comment", "default", "examples")
TYPES = ("string", "number", "integer", "boolean", "null", "array", "object")
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength")


def schema_problems(schema: Any, where: str = "schema") -> list[str]:
    """Every reason the schema is outside the subset or malformed, each naming the keyword's place in it."""
    if not isinstance(schema, dict):
        return [f"{where}: a schema is a mapping of keywords, not {type(schema).__name__}"]
    problems = []
    for key, value in schema.items():
        if key not in KEYWORDS and key not in ANNOTATIONS:
            problems.append(f"{where}: unsupported keyword `{key}` (finetune checks only {', '.join(KEYWORDS)}); "
                            "remove it, or check that constraint in a reward function of your own")
        elif key in KEYWORDS:
            problems.extend(_keyword_problems(key, value, f"{where}.{key}"))
    return problems


def _keyword_problems(key: str, value: Any, where: str) -> list[str]:
    if key == "type":
        names = value if isinstance(value, list) and value else [value]
        bad = [n for n in names if n not in TYPES]
        return [f"{where}: {bad[0]!r} is not a JSON type ({', '.join(TYPES)})"] if bad else []
    if key == "properties":
        if not isinstance(value, dict):
            return [f"{where}: a mapping of property names to schemas"]
        return [p for name, sub in value.items() for p in schema_problems(sub, f"{where}.{name}")]
    if key == "items":
        return schema_problems(value, where)
    if key == "anyOf":
        if not isinstance(value, list) or not value:
            return [f"{where}: a non-empty list of schemas"]
        return [p for i, sub in enumerate(value) for p in schema_problems(sub, f"{where}[{i}]")]
    if key == "required" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return [f"{where}: a list of property names"]
    if key == "additionalProperties" and not isinstance(value, bool):
        return [f"{where}: true or false here (a schema for the extra properties is not supported)"]
    if key == "enum" and not (isinstance(value, list) and value):
        return [f"{where}: a non-empty list of values"]
    if key in _COUNTS and not (_is_integer(value) and value >= 0):
        return [f"{where}: a whole number >= 0"]
    if key in ("minimum", "maximum") and not _is_number(value):
        return [f"{where}: a number"]
    return []


def first_error(instance: Any, schema: dict, where: str = "$") -> str | None:
    """Why the (parsed JSON) instance does not validate against the schema (checked by schema_problems first), or
    None when it does."""
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_has_type(instance, name) for name in names):
            return f"{where}: expected {' or '.join(names)}, got {_type_of(instance)}"
    if "enum" in schema and not any(same(instance, option) for option in schema["enum"]):
        return f"{where}: not one of the enum's values"
    if "const" in schema and not same(instance, schema["const"]):
        return f"{where}: not the const value"
    if "anyOf" in schema and all(first_error(instance, sub, where) for sub in schema["anyOf"]):
        return f"{where}: matches none of anyOf's schemas"
    if _is_number(instance):
        if "minimum" in schema and instance < schema["minimum"]:
            return f"{where}: below the minimum {schema['minimum']}"
        if "maximum" in schema and instance > schema["maximum"]:
            return f"{where}: above the maximum {schema['maximum']}"
    if isinstance(instance, str):
        return _bounds(len(instance), schema, "minLength", "maxLength", where, "characters")
    if isinstance(instance, list):
        return _array_error(instance, schema, where)
    if isinstance(instance, dict):
        return _object_error(instance, schema, where)
    return None


def _array_error(instance: list, schema: dict, where: str) -> str | None:
    error = _bounds(len(instance), schema, "minItems", "maxItems", where, "items")
    for i, item in enumerate(instance if "items" in schema and not error else []):
        error = first_error(item, schema["items"], f"{where}[{i}]")
        if error:
            break
    return error


def _object_error(instance: dict, schema: dict, where: str) -> str | None:
    missing = [name for name in schema.get("required", []) if name not in instance]
    if missing:
        return f"{where}: missing required property `{missing[0]}`"
    properties = schema.get("properties", {})
    if schema.get("additionalProperties") is False:
        extra = [name for name in instance if name not in properties]
        if extra:
            return f"{where}: property `{extra[0]}` is not allowed (additionalProperties is false)"
    for name, sub in properties.items():
        if name in instance:
            error = first_error(instance[name], sub, f"{where}.{name}")
            if error:
                return error
    return None


def _bounds(size: int, schema: dict, low: str, high: str, where: str, unit: str) -> str | None:
    if low in schema and size < schema[low]:
        return f"{where}: {size} {unit}, fewer than {low} {schema[low]}"
    if high in schema and size > schema[high]:
        return f"{where}: {size} {unit}, more than {high} {schema[high]}"
    return None


def same(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value (1 == 1.0), but a boolean is never a number (True != 1, unlike Python)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    """JSON Schema's integer: any number with no fractional part, so 1.0 is one (draft 6 onwards)."""
    return _is_number(value) and (isinstance(value, int) or (math.isfinite(value) and value.is_integer()))


def _has_type(value: Any, name: str) -> bool:
    checks = {"string": lambda v: isinstance(v, str), "number": _is_number, "integer": _is_integer,
              "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None,
              "array": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict)}
    return checks[name](value)


def _type_of(value: Any) -> str:
    return next(name for name in ("boolean", "integer", "number", "string", "null", "array", "object")
                if _has_type(value, name))
