"""Tool (function) calls in /v1/chat/completions: the prompt format, the constraint, the parsing.

The format is the one most ChatML fine-tunes with tools use (Hermes, Qwen 2.5): the tools' JSON
signatures go into the system message inside `<tools></tools>`, and a call is written as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

An assistant message's earlier `tool_calls` are rendered the same way, and a `tool` message (a call's
result) as a `tool` turn. Calls are not left to chance: `tool_choice` "required" or a named function
constrains the reply to one or more calls (with `parallel_tool_calls`) whose JSON matches the
functions' `parameters` schemas; "auto" lets the reply be either calls or plain text that does not
start with `<`; "none" leaves it free. A reply that ends as complete calls is returned as
`tool_calls` with finish_reason 'tool_calls'.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from gptlab.infer.constrain import Constraint

CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
_CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.S)
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-message text that lists `tools` (OpenAI's `{"type": "function", "function": {...}}`)."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f'<tool_call></tool_call> XML tags:\n{CALL_OPEN}{{"name": <function-name>, "arguments": <args-json-object>}}'
        f"{CALL_CLOSE}"
    )


def render_calls(calls: Sequence[Mapping[str, Any]]) -> str:
    """An assistant message's `tool_calls` as text (arguments are a JSON string, as OpenAI sends them)."""
    out = []
    for call in calls:
        function = call["function"]
        try:
            arguments = json.loads(function["arguments"])
        except (TypeError, ValueError):
            arguments = function["arguments"]
        out.append(f"{CALL_OPEN}{json.dumps({'name': function['name'], 'arguments': arguments})}{CALL_CLOSE}")
    return "\n".join(out)


def with_tools(messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with the tools' listing appended to the first system message (or a new one first)."""
    text = tools_prompt(tools)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}" if first["content"] else text}, *messages[1:]]
    return [{"role": "system", "content": text, "name": None}, *messages]


def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    arguments = function.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_constraint(tools: Sequence[Mapping[str, Any]], choice: Any, parallel: bool) -> Constraint | None:
    """The Lark grammar a reply must follow under `tool_choice` (None: unconstrained)."""
    if choice == "none":
        return None
    if isinstance(choice, Mapping):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    schema = {"anyOf": [_call_schema(t) for t in tools], "x-guidance": _COMPACT}
    lines = [
        f"call: {json.dumps(CALL_OPEN)} %json {json.dumps(schema)} {json.dumps(CALL_CLOSE)}",
        'calls: call ("\\n" call)*' if parallel else "calls: call",
    ]
    if choice == "auto":
        lines += ["start: calls | TEXT", r"TEXT: /[^<][\s\S]*/"]
    else:
        lines.insert(0, "start: calls")
    return Constraint.grammar("\n".join(lines))


def parse_calls(text: str) -> list[dict[str, Any]] | None:
    """The `tool_calls` of a finished reply made of calls, or None for a plain-text reply."""
    if not text.startswith(CALL_OPEN):
        return None
    calls = []
    for match in _CALL.finditer(text):
        call = json.loads(match.group(1))
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
            }
        )
    return calls or None


def message_dict(m: Any) -> dict[str, Any]:
    """A request message as the template's dict: earlier tool calls written into the content."""
    content = m.text()
    if m.tool_calls:
        rendered = render_calls([c.model_dump() for c in m.tool_calls])
        content = f"{content}\n{rendered}" if content else rendered
    return {"role": m.role, "content": content, "name": m.name}


def reply(c: Any, calls: bool) -> tuple[dict[str, Any], str]:
    """The assistant message and finish_reason of a finished completion: its tool calls when it ended
    as complete calls."""
    if calls and c.finish_reason == "stop":
        try:
            found = parse_calls(c.text)
        except (ValueError, KeyError, TypeError):  # not calls after all: the text is the answer
            found = None
        if found:
            return {"role": "assistant", "content": None, "tool_calls": found}, "tool_calls"
    return {"role": "assistant", "content": c.text}, c.finish_reason
