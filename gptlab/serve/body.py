"""From the bytes of a request body to a validated request model, or an APIError naming the field.

Only `application/json` is parsed (anything else is a 415: a browser page may send a cross-origin
`text/plain` POST without asking first, never an `application/json` one). The body must be strict UTF-8
JSON whose numbers are all finite (Python's json reads `1e999` as inf and accepts `NaN`), whose strings
are valid Unicode (a `\\ud800` escape decodes to a lone surrogate, which cannot be encoded or
tokenized) and which nests at most `MAX_DEPTH` levels; then the pydantic model validates it.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gptlab.serve.protocol import APIError

MAX_DEPTH = 32  # the deepest real request (messages[i].content[j].text) is 5 levels
Model = TypeVar("Model", bound=BaseModel)


def parse_body(content_type: str | None, raw: bytes, model: type[Model]) -> Model:
    """`raw` (sent with `content_type`) as an instance of `model`; APIError 415 or 400 otherwise."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415,
            f"the request body must be sent as 'Content-Type: application/json', not {content_type!r}",
            code="unsupported_media_type",
        )
    data = parse_json(raw)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


def parse_json(raw: bytes) -> Any:
    """The JSON value of `raw`, checked for finite numbers, valid Unicode and bounded nesting."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _invalid_json(f"the body is not UTF-8: byte {e.start} is {raw[e.start : e.start + 1]!r}") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise _invalid_json(f"it nests more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError, and integers of more than 4300 digits
        raise _invalid_json(str(e)) from None
    check_values(data)
    return data


def check_values(data: Any) -> None:
    """APIError 400 naming the first non-finite number, lone surrogate or too-deep value in `data`."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:  # iterative: a hostile body must not be able to exhaust Python's recursion limit
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"'{path}' nests more than {MAX_DEPTH} levels deep", param=path or None)
        if isinstance(value, float) and not math.isfinite(value):
            raise APIError(400, f"Invalid value for '{path}': numbers must be finite, got {value}", param=path or None)
        if isinstance(value, str) and _has_surrogate(value):
            raise APIError(
                400,
                f"Invalid value for '{path}': the string holds a lone UTF-16 surrogate (an unpaired \\ud800-"
                "\\udfff escape), which is not valid Unicode",
                param=path or None,
            )
        if isinstance(value, dict):
            for key, item in value.items():
                if _has_surrogate(key):
                    raise APIError(400, f"a key in '{path or 'the body'}' holds a lone UTF-16 surrogate")
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _invalid_json(why: str) -> APIError:
    return APIError(400, f"We could not parse the JSON body of your request ({why}); send valid JSON.")


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """One OpenAI error naming the parameter of the first pydantic validation error."""
    first = errors[0]
    param = _param([p for p in first.get("loc", ()) if p != "body"])
    if not param:
        return APIError(400, f"the request body must be a JSON object: {first.get('msg')}")
    msgs = list(
        dict.fromkeys(e.get("msg", "") for e in errors if _param([p for p in e["loc"] if p != "body"]) == param)
    )
    return APIError(400, f"Invalid value for '{param}': {' or '.join(msgs)}", param=param)


def _param(loc: list[Any]) -> str:
    """'messages[0].role' from a pydantic location; union member tags ('str', 'list[int]') are dropped."""
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and p.isidentifier() and p not in {"str", "int", "float", "bool", "list", "dict"}:
            out += f".{p}" if out else p
    return out
