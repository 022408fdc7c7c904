"""Request models and response shapes of the OpenAI API subset the server speaks.

Requests are pydantic models with strict types (`"0.5"` is not a temperature), so a wrong type or an
out-of-range value fails validation with the parameter's name. Fields OpenAI defines but this server
cannot honour (`logit_bias`, `suffix`, `tools`, ...) are accepted only at their no-op value and refused
otherwise, never silently ignored; unknown fields are refused.
Responses are plain dicts built by the functions below, in OpenAI's exact field layout.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr, StringConstraints

from gptlab.infer.sampling import MAX_LOGPROBS
from gptlab.serve.chat import NAME_PATTERN

Float = Annotated[float, Strict()]  # ints are accepted, strings are not
MAX_STOP = 4  # OpenAI's limit on stop sequences


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

    def check_supported(self) -> None:
        """Raise APIError 400 naming the first field set to a value this server cannot honour."""
        for name, why in self._refused().items():
            raise APIError(400, f"{name} is not supported by this server: {why}", param=name)

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

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"stop takes at most {MAX_STOP} sequences, got {len(stop)}", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "stop sequences must be non-empty strings", param="stop")
        return stop

    def _refused(self) -> dict[str, str]:
        refused = {}
        if self.logit_bias:
            refused["logit_bias"] = "send null or {}"
        return refused


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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: Annotated[StrictStr, StringConstraints(pattern=NAME_PATTERN)] | None = None  # no template markers

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
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def _refused(self) -> dict[str, str]:
        refused = super()._refused()
        if self.tools:
            refused["tools"] = "function calling is not available; send null"
        if self.tool_choice not in (None, "none"):
            refused["tool_choice"] = "function calling is not available; send null"
        if self.response_format and self.response_format.get("type") != "text":
            refused["response_format"] = "only {'type': 'text'} is available"
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
