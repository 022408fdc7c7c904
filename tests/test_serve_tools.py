"""Tool calls in /v1/chat/completions (`tools`, `tool_choice`, `parallel_tool_calls`), driven by the
official `openai` client: every call a tiny random model makes under a constraint names a listed
function and its arguments validate against that function's parameters."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pytest.importorskip("llguidance", reason="tool calls need llguidance: pip install 'gptlab[structured]'")
jsonschema = pytest.importorskip("jsonschema", reason="validating arguments needs jsonschema (the dev extra)")

from gptlab.config import ModelConfig  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.serve.app import create_app, serve_in_thread  # noqa: E402
from gptlab.serve.tools import parse_calls, render_calls  # noqa: E402

KEY, NAME = "sk-test-key", "tiny"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(tiny_tokenizer):
    """A server with a context long enough for the tool listing in the system prompt."""
    torch.manual_seed(0)
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, n_ctx=2048, vocab_size=tiny_tokenizer.vocab_size)
    app = create_app(GPT(config).eval(), tiny_tokenizer, model_name=NAME, api_key=KEY, max_concurrent=4)
    with serve_in_thread(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def params(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": params({"city": {"enum": ["Paris", "Oslo"]},
                                                            "unit": {"enum": ["C", "F"]}})}},
    {"type": "function", "function": {"name": "add", "parameters": params({"a": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 9},
                                                                            "b": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 9}})}},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(choice, names=tuple(SCHEMAS), most: int = 1) -> None:
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert 1 <= len(choice.message.tool_calls) <= most
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_tool_choice_give_valid_calls(client):
    r = client.chat.completions.create(
        model=NAME, messages=CHAT, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        n=4, temperature=1, seed=1, max_tokens=200,
    )  # fmt: skip
    for choice in r.choices:
        check_calls(choice)
    r = client.chat.completions.create(
        model=NAME, messages=CHAT, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        n=4, temperature=1, seed=2, max_tokens=300,
    )  # fmt: skip
    for choice in r.choices:
        check_calls(choice, names=("add",), most=10)


def test_auto_gives_text_or_valid_calls_and_history_renders(client):
    r = client.chat.completions.create(
        model=NAME, messages=CHAT, tools=TOOLS, n=4, temperature=1, seed=3, max_tokens=200
    )
    for choice in r.choices:
        if choice.message.tool_calls:
            check_calls(choice, most=10)
        else:
            assert choice.message.content and not choice.message.content.startswith("<")
    history = [
        *CHAT,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]  # fmt: skip
    r = client.chat.completions.create(model=NAME, messages=history, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.content is not None and r.choices[0].finish_reason == "length"


def test_streamed_tool_calls(client):
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=CHAT, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            temperature=1, seed=4, max_tokens=200, stream=True,
        )
    )  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    (delta,) = deltas
    (call,) = delta.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tools=TOOLS + TOOLS[:1]), "tools"),
        (dict(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools"),
        (dict(tools=TOOLS, response_format={"type": "json_object"}), "response_format"),
    ],
)
def test_bad_tool_requests_are_400s(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4, **kwargs)
    assert e.value.body["param"].split(".")[0].split("[")[0] == param


def test_rendered_calls_parse_back():
    calls = [{"id": "x", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]
    (parsed,) = parse_calls(render_calls(calls))
    assert parsed["function"] == calls[0]["function"] and parse_calls("hello") is None
