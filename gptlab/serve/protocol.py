"""Request models and response shapes of the OpenAI API subset the server speaks.

Requests are pydantic models with strict types (`"0.5"` is not a temperature), so a wrong type or an
out-of-range value fails validation with the parameter's name. Fields OpenAI defines but this server
cannot honour (`suffix`, `best_of` other than n) are accepted only at their no-op value and refused
otherwise, never silently ignored; fields OpenAI documents that cannot change a local model's output
(`store`, `metadata`, `service_tier`, `user`, ...) are accepted (each logged once, at debug level);
unknown fields are refused.
Responses are plain dicts built by the functions below, in OpenAI's exact field layout.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, StringConstraints

from gptlab.infer.constrain import Constraint
from gptlab.infer.sampling import LOGIT_BIAS_RANGE, MAX_LOGPROBS
from gptlab.serve.chat import NAME_PATTERN

Float = Annotated[float, Strict()]  # ints are accepted, strings are not
MAX_STOP = 4  # OpenAI's limit on stop sequences
log = logging.getLogger("gptlab.serve")
_noted: set[str] = set()


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    NO_OP_FIELDS: ClassVar[tuple[str, ...]] = ()
    """Fields OpenAI documents that cannot change this server's output: accepted, noted once."""

    def check_supported(self) -> None:
        """Raise APIError 400 naming the first field set to a value this server cannot honour."""
        for name, why in self._refused().items():
            raise APIError(400, f"{name} is not supported by this server: {why}", param=name)
        for name in self.NO_OP_FIELDS:
            if getattr(self, name) is not None and name not in _noted:
                _noted.add(name)
                log.debug("accepted %s: it does not change a local model's output", name)

    def _refused(self) -> dict[str, str]:
        return {}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class _SamplingFields(_Request):
    """The sampling fields completions and chat share (plus the vLLM-style extensions top_k, min_p,
    repetition_penalty)."""

    model: StrictStr | None = None
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    n: StrictInt | None = Field(None, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    user: StrictStr | None = None
    logit_bias: dict[str, Any] | None = None
    top_k: StrictInt | None = Field(None, ge=0)
    min_p: Float | None = Field(None, ge=0, le=1)
    repetition_penalty: Float | None = Field(None, ge=0.01, le=100)
    response_format: dict[str, Any] | None = None

    NO_OP_FIELDS: ClassVar[tuple[str, ...]] = ("user",)

    def check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:  # as OpenAI answers it
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        super().check_supported()

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"stop takes at most {MAX_STOP} sequences, got {len(stop)}", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "stop sequences must be non-empty strings", param="stop")
        return stop

    def logit_biases(self, vocab: int) -> dict[int, float]:
        """`logit_bias` as token id -> bias; a 400 naming the first key that is not a token id of the
        vocabulary or whose value is not a number in [-100, 100]."""
        lo, hi = LOGIT_BIAS_RANGE
        out = {}
        for key, value in (self.logit_bias or {}).items():
            token = int(key) if key.isascii() and key.isdigit() and len(key) < 10 else -1
            if not 0 <= token < vocab:
                raise APIError(
                    400,
                    f"logit_bias key {key!r} is not a token id of this model's vocabulary [0, {vocab})",
                    param="logit_bias",
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise APIError(
                    400,
                    f"logit_bias[{key!r}] is {value!r}; a bias must be a number in [{lo:g}, {hi:g}]",
                    param="logit_bias",
                )
            out[token] = float(value)
        return out

    def constraint(self) -> Constraint | None:
        """`response_format` as a Constraint (None for text): OpenAI's `{"type": "json_object"}` and
        `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`, and two
        gptlab extensions, `{"type": "regex", "pattern": RE}` and `{"type": "grammar", "grammar": LARK_OR_GBNF}`.
        A malformed one is a 400 naming response_format."""
        fmt = self.response_format
        if fmt is None:
            return None

        def bad(message: str) -> APIError:
            return APIError(400, f"response_format: {message}", param="response_format")

        kind = fmt.get("type")
        expected = {"text": set(), "json_object": set(), "json_schema": {"json_schema"}, "regex": {"pattern"},
                    "grammar": {"grammar"}}  # fmt: skip
        if not isinstance(kind, str) or kind not in expected:
            raise bad(f"type must be one of {sorted(expected)}, got {kind!r}")
        extra = sorted(set(fmt) - {"type"} - expected[kind])
        missing = sorted(expected[kind] - set(fmt))
        if extra or missing:
            raise bad(f"type {kind!r} takes the field(s) {sorted(expected[kind])}; got {sorted(fmt)}")
        if kind == "text":
            return None
        if kind == "json_object":
            return Constraint.json()
        if kind in ("regex", "grammar"):
            text = fmt[next(iter(expected[kind]))]
            if not isinstance(text, str) or not text:
                raise bad(f"a {kind} response_format needs a non-empty string")
            return Constraint(kind, text)
        spec = fmt["json_schema"]
        if not isinstance(spec, dict):
            raise bad("json_schema must be an object with 'name' and 'schema'")
        unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if unknown:
            raise bad(f"unknown json_schema field(s) {unknown}; expected name, schema, strict, description")
        name = spec.get("name")
        if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
            raise bad(f"json_schema.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if not isinstance(spec.get("strict", False), (bool, type(None))):
            raise bad(f"json_schema.strict must be a boolean, got {spec['strict']!r}")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise bad(f"json_schema.schema must be a JSON Schema object, got {type(schema).__name__}")
        return Constraint.json_schema(schema)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] | None = None
    max_tokens: StrictInt | None = Field(16, ge=0)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool | None = False
    best_of: StrictInt | None = Field(None, ge=1)
    suffix: StrictStr | None = None

    def _refused(self) -> dict[str, str]:
        refused = super()._refused()
        if self.best_of is not None and self.best_of != (self.n or 1):
            refused["best_of"] = "send null or the same value as n"
        if self.suffix:
            refused["suffix"] = "insertion is not available; send null"
        return refused


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


Name = Annotated[StrictStr, StringConstraints(pattern=NAME_PATTERN)]  # OpenAI's rule: no template markers


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    arguments: StrictStr


class ToolCall(BaseModel):
    """A call in an earlier assistant message."""

    model_config = ConfigDict(extra="forbid")
    id: StrictStr
    type: Literal["function"]
    function: FunctionCall


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: Name | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant message's calls."""
    tool_call_id: StrictStr | None = None
    """A tool message: the call it answers."""

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    # Documented by OpenAI, no effect on what a local model writes:
    store: StrictBool | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    service_tier: StrictStr | None = None
    modalities: list[Literal["text"]] | None = None
    """Only text: audio output would change the reply, so it fails validation."""
    prediction: dict[str, Any] | None = None
    """Predicted output: a latency hint to OpenAI's models; the reply is the same without it."""
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None

    NO_OP_FIELDS: ClassVar[tuple[str, ...]] = (
        "user", "store", "metadata", "service_tier", "modalities", "prediction", "prompt_cache_key",
        "safety_identifier", "parallel_tool_calls",
    )  # fmt: skip

    def tool_mode(self) -> Any:
        """The effective tool_choice ("none" without tools, "auto" by default with them), after the
        checks OpenAI makes: a 400 naming tools or tool_choice."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise APIError(400, "tool_choice needs tools: send the functions in tools", param="tool_choice")
            return "none"
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise APIError(400, f"tools holds duplicate function names: {names}", param="tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice names the function {self.tool_choice.function.name!r}, which is not in tools {names}",
                param="tool_choice",
            )
        choice = self.tool_choice if self.tool_choice is not None else "auto"
        if choice != "none" and self.response_format and self.response_format.get("type") != "text":
            raise APIError(400, "response_format cannot be combined with tool calls", param="response_format")
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    def _refused(self) -> dict[str, str]:
        refused = super()._refused()
        if self.top_logprobs is not None and not self.logprobs:
            refused["top_logprobs"] = "set logprobs to true to use top_logprobs"
        return refused


# ---- responses ----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "gptlab"}


def completion_logprobs(items: list, offset: int = 0, first_token: str | None = None) -> dict[str, Any]:
    """OpenAI's legacy completions `logprobs` object from TokenLogprob items; a None item is the first
    prompt token (echo), which nothing predicts: its text is `first_token`, its logprob null.
    `offset` is the character offset of the first item in the choice's text."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for item in items:
        offsets.append(offset)
        if item is None:
            token = first_token or ""
            tokens.append(token)
            token_logprobs.append(None)
            top.append(None)
        else:
            token = item.token
            tokens.append(token)
            token_logprobs.append(item.logprob)
            top.append({t: logprob for t, logprob in item.top})
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(items: list, token_bytes: Any) -> dict[str, Any]:
    """Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""

    def entry(token: str, logprob: float, token_id: int | None = None) -> dict[str, Any]:
        raw = token_bytes(token_id) if token_id is not None else token.encode("utf-8")
        return {"token": token, "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            {
                **entry(item.token, item.logprob, item.token_id),
                "top_logprobs": [entry(token, logprob) for token, logprob in item.top],
            }
            for item in items
        ]
    }


# ---- /tokenize and /detokenize (as vLLM and llama.cpp name them) ----------------------------------------
class TokenizeRequest(_Request):
    """POST /tokenize: `prompt` (vLLM) or `content` (llama.cpp); `add_special_tokens` is accepted for
    vLLM's clients (GPT-2's tokenizer adds none)."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    content: StrictStr | None = None
    add_special_tokens: StrictBool | None = None

    def text(self) -> str:
        if (self.prompt is None) == (self.content is None):
            raise APIError(400, "send the text to tokenize as prompt (or content), exactly one of them", param="prompt")
        return self.prompt if self.prompt is not None else self.content  # type: ignore[return-value]


class DetokenizeRequest(_Request):
    """POST /detokenize: token ids back to text."""

    model: StrictStr | None = None
    tokens: list[StrictInt]


class EmbeddingRequest(_Request):
    """POST /v1/embeddings."""

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: StrictInt | None = Field(None, ge=1)
    user: StrictStr | None = None

    NO_OP_FIELDS: ClassVar[tuple[str, ...]] = ("user",)
