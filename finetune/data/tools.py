"""Tool-calling rows in one shape, OpenAI's, which chat templates read through `apply_chat_template(tools=...)`
(transformers docs, "Tool use": tools as JSON schemas, assistant `tool_calls` with `arguments` as an object, results
as `role: tool` turns).

Accepted: OpenAI rows (`tools`, assistant `tool_calls` whose `arguments` is a JSON string or object, `role: tool`
results with optional `tool_call_id`/`name`) and LLaMA-Factory's ShareGPT convention (data/README.md there:
`function_call` turns whose value is a JSON string `{"name": ..., "arguments": ...}` or a list of them,
`observation` turns holding the result, and `tools` as a JSON string, as in glaive_toolcall_en_demo).
"""

from __future__ import annotations

import json
from typing import Any


def parse_tools(value: Any) -> list[dict]:
    """A row's `tools`: a list (or its JSON text) of function schemas, each as {"type": "function", "function": ...}."""
    if isinstance(value, str):
        value = _json(value, "`tools`")
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise ValueError("`tools` must be a list of function schemas (or its JSON text)")
    tools = []
    for number, tool in enumerate(value, start=1):
        function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"`tools` item {number} must be a function schema with a `name` (type {tool.get('type')!r}"
                             " is not supported)" if function is None else f"`tools` item {number} has no `name`")
        tools.append({"type": "function", "function": function})
    return tools


def openai_calls(value: Any, where: str) -> list[dict]:
    """An assistant turn's `tool_calls` in the one shape: name, `arguments` as an object, the call `id` if any."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: `tool_calls` must be a non-empty list")
    calls = []
    for number, call in enumerate(value, start=1):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"{where}: tool call {number} must be an object with a function `name`")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            arguments = _json(arguments, f"{where}: tool call {number} `arguments`") if arguments.strip() else {}
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}: tool call {number} `arguments` must be a JSON object")
        shaped = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str) and call["id"]:
            shaped["id"] = call["id"]
        calls.append(shaped)
    return calls


def sharegpt_calls(value: Any, where: str) -> list[dict]:
    """A ShareGPT `function_call` turn's value: the JSON text of one call or of a list of calls."""
    parsed = _json(value, f"{where}: the function call") if isinstance(value, str) else value
    return openai_calls(parsed if isinstance(parsed, list) else [parsed], where)


def result_text(value: Any, where: str) -> str:
    """A tool result as text: strings as given, JSON values as their JSON text."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (dict, list)) and value:
        return json.dumps(value, ensure_ascii=False)
    raise ValueError(f"{where}: a tool result must be a non-empty string or JSON value")


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not valid JSON ({err.msg} at character {err.pos})") from None


def name_results(messages: list[dict]) -> list[dict]:
    """Tool results without a `name` get their call's, which some templates require (Hermes-2-Pro's tool_use
    template raises without it): the call with the result's `tool_call_id`, else the call in the same position
    among the calls the results answer (OpenAI's order). Nothing is invented: a result whose call is ambiguous keeps
    no name, and the template decides."""
    named, calls, answered = [], [], 0
    for message in messages:
        if message.get("tool_calls"):
            calls, answered = message["tool_calls"], 0
        elif message["role"] == "tool" and calls:
            by_id = [c for c in calls if message.get("tool_call_id") and c.get("id") == message["tool_call_id"]]
            call = by_id[0] if by_id else calls[answered] if answered < len(calls) else None
            answered += 1
            if call is not None and "name" not in message:
                message = {**message, "name": call["function"]["name"]}
        named.append(message)
    return named
