"""What the /v1 routes do: validate against the limits, submit to the engine, shape the answer
(a JSON body, or Server-Sent Events chunks in OpenAI's format)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gptlab.infer.constrain import Constraint, compile_check
from gptlab.infer.embed import embed
from gptlab.infer.sampling import SamplingParams
from gptlab.serve import chat as chat_template
from gptlab.serve import tools as chat_tools
from gptlab.serve.engine import Engine
from gptlab.serve.jobs import Delta, EngineError, Finished, Job, PromptLogprobs, QueueFull
from gptlab.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    model_card,
    new_id,
    now,
    usage,
)


@dataclass
class ServerLimits:
    """Caps on what one request may ask for; a request over one gets a 400 (413 for the body)."""

    max_body_bytes: int = 1 << 20
    """Largest request body accepted, in bytes."""
    max_prompt_tokens: int | None = None
    """Most tokens in one prompt (default: the context minus one)."""
    max_tokens: int | None = None
    """Largest `max_tokens` (default: the context minus one)."""
    max_n: int = 8
    """Largest `n` (never more than the server's concurrent sequences)."""
    max_prompts: int = 32
    """Most prompts in one completions request."""


@dataclass
class _Results:
    finished: dict[int, Finished]
    prompt_logprobs: dict[int, list]


class Handlers:
    def __init__(
        self, model: Any, tokenizer: Any, engine: Engine, model_name: str, limits: ServerLimits
    ) -> None:
        self.tokenizer, self.engine, self.model_name, self.limits = tokenizer, engine, model_name, limits
        self.model = model
        self.created = now()
        self.n_ctx = model.config.n_ctx
        self.vocab = min(model.config.vocab_size, tokenizer.vocab_size)
        self.max_prompt_tokens = limits.max_prompt_tokens or self.n_ctx - 1
        self.max_tokens = limits.max_tokens or self.n_ctx - 1
        self.max_n = min(limits.max_n, engine.max_concurrent)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def model_card(self) -> dict[str, Any]:
        """/v1/models' entry, with the context length as vLLM (max_model_len) and llama.cpp (n_ctx) give it."""
        return {**model_card(self.model_name, self.created), "max_model_len": self.n_ctx, "context_length": self.n_ctx}

    # ---- /v1/embeddings -----------------------------------------------------------------------------
    async def embeddings(self, body: EmbeddingRequest) -> dict[str, Any]:
        """The mean of the final hidden states over each input's tokens, L2-normalised
        (`gptlab.infer.embed`); `encoding_format: "base64"` packs float32 little-endian, as OpenAI does."""
        body.check_supported()
        self.check_model(body.model)
        width = self.model.config.n_embd
        if body.dimensions is not None and body.dimensions != width:
            raise APIError(
                400, f"dimensions={body.dimensions}: this model's embeddings have {width}", param="dimensions"
            )
        inputs, _ = await self._completion_prompts(body.input, "input")
        for i, ids in enumerate(inputs):
            if len(ids) > self.n_ctx:
                raise APIError(
                    400, f"input {i} has {len(ids)} tokens; this model takes at most {self.n_ctx}", param="input"
                )
        vectors = await asyncio.to_thread(embed, self.model, inputs)
        if body.encoding_format == "base64":
            data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
        else:
            data = vectors.tolist()
        tokens = sum(map(len, inputs))
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "model": self.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # ---- /tokenize, /detokenize ---------------------------------------------------------------------
    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        ids = await asyncio.to_thread(self.tokenizer.encode, body.text())
        return {"tokens": ids, "count": len(ids), "max_model_len": self.n_ctx}

    def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < self.vocab]
        if bad:
            raise APIError(
                400, f"tokens holds ids outside the vocabulary [0, {self.vocab}): {bad[:8]}", param="tokens"
            )
        text = self.tokenizer.decode(body.tokens)
        return {"prompt": text, "content": text}

    # ---- /v1/completions -----------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Any) -> Any:
        body.check_supported()
        self.check_model(body.model)
        prompts, texts = await self._completion_prompts(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        self._check_lengths(prompts, max_tokens, "prompt")
        params = await self._constrained(self._params(body, max_tokens, body.logprobs), body.constraint())
        echo_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        job = self._submit(prompts, params, body.stops(), echo_logprobs, bool(body.stream))
        meta = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": self.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._completion_chunks(
                job, meta, prompts, texts, params, bool(body.echo), include_usage
            )
            return self._sse(job, chunks)
        results = await self._collect(job, request)
        choices = []
        for index in range(len(prompts) * params.n):
            done = results.finished[index]
            c, p = done.completion, index // params.n
            text, logprobs = c.text, None
            if body.logprobs is not None:
                items = list(c.logprobs or [])
                offset = 0
                if body.echo:
                    items = results.prompt_logprobs[p] + items
                logprobs = completion_logprobs(
                    items, offset, self._first_token(prompts[p]) if body.echo else None
                )
            if body.echo:
                text = texts[p] + text
            choices.append(
                {"text": text, "index": index, "logprobs": logprobs, "finish_reason": c.finish_reason}
            )
        generated = sum(f.generated for f in results.finished.values())
        return {**meta, "choices": choices, "usage": usage(sum(map(len, prompts)), generated)}

    async def _completion_chunks(
        self,
        job: Job,
        meta: dict,
        prompts: list[list[int]],
        texts: list[str],
        params: SamplingParams,
        echo: bool,
        include_usage: bool,
    ) -> AsyncIterator[dict]:
        want_logprobs = params.logprobs is not None
        offsets: dict[int, int] = {}
        prompt_lps: dict[int, list] = {}
        generated = 0

        def chunk(index: int, text: str, logprobs: Any = None, finish: str | None = None) -> dict:
            out = {
                **meta,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
            }
            return {**out, "usage": None} if include_usage else out

        async for event in job.events():
            if isinstance(event, PromptLogprobs):
                prompt_lps[event.prompt_index] = event.logprobs
                continue
            index = event.index
            if index not in offsets:  # this choice's first event
                offsets[index] = 0
                if echo:
                    p = index // params.n
                    lp = None
                    if want_logprobs:
                        lp = completion_logprobs(prompt_lps.get(p, []), 0, self._first_token(prompts[p]))
                    offsets[index] = len(texts[p])
                    yield chunk(index, texts[p], lp)
            if isinstance(event, Delta):
                lp = completion_logprobs(event.logprobs, offsets[index]) if want_logprobs else None
                offsets[index] += sum(len(item.token) for item in event.logprobs)
                yield chunk(index, event.text, lp)
            elif isinstance(event, Finished):
                generated += event.generated
                yield chunk(index, "", None, event.completion.finish_reason)
        if include_usage:
            yield {**meta, "choices": [], "usage": usage(sum(map(len, prompts)), generated)}

    async def _completion_prompts(self, prompt: Any, param: str = "prompt") -> tuple[list[list[int]], list[str]]:
        tok = self.tokenizer
        if prompt is None:
            prompt = [[tok.eot_id]]
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, f"{param} must not be an empty list", param=param)
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if len(prompt) > self.limits.max_prompts:
            raise APIError(
                400,
                f"{param} holds {len(prompt)} prompts; this server accepts at most "
                f"{self.limits.max_prompts} per request",
                param=param,
            )
        if isinstance(prompt[0], str):
            ids = [await self._encode(p) for p in prompt]
            return ids, list(prompt)
        for i, p in enumerate(prompt):
            if not p:
                raise APIError(400, f"prompt {i} is an empty list of token ids", param=param)
            bad = [t for t in p if not 0 <= t < self.vocab]
            if bad:
                raise APIError(
                    400,
                    f"token id {bad[0]} in prompt {i} is outside the vocabulary [0, {self.vocab})",
                    param=param,
                )
        return [list(p) for p in prompt], [tok.decode(p) for p in prompt]

    # ---- /v1/chat/completions ------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Any) -> Any:
        body.check_supported()
        self.check_model(body.model)
        tool_choice = body.tool_mode()
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        messages = [chat_tools.message_dict(m) for m in body.messages]
        if tools:
            messages = chat_tools.with_tools(messages, tools)
        ids = await self._encode(chat_template.render_chat(messages))
        max_tokens = body.max_completion_tokens or body.max_tokens
        if len(ids) > self.max_prompt_tokens:
            self._check_lengths([ids], 0, "messages")
        if max_tokens is None:
            max_tokens = min(self.max_tokens, max(self.n_ctx - len(ids), 1))
        self._check_lengths([ids], max_tokens, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        calls = bool(tools) and tool_choice != "none"
        if calls:
            constraint = chat_tools.tool_constraint(tools, tool_choice, body.parallel_tool_calls is not False)
        else:
            constraint = body.constraint()
        params = self._params(body, max_tokens, logprobs)
        params = await self._constrained(params, constraint, "tools" if calls else "response_format")
        job = self._submit([ids], params, body.stops() + chat_template.STOP, None, bool(body.stream))
        meta = {"id": new_id("chatcmpl"), "created": now(), "model": self.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._sse(job, self._chat_chunks(job, meta, len(ids), params, include_usage, calls))
        results = await self._collect(job, request)
        choices = []
        for index in range(params.n):
            c = results.finished[index].completion
            message, finish = chat_tools.reply(c, calls)
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": chat_logprobs(c.logprobs or [], self.tokenizer.token_bytes)
                    if logprobs is not None
                    else None,
                    "finish_reason": finish,
                }
            )
        generated = sum(f.generated for f in results.finished.values())
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(len(ids), generated)}

    async def _chat_chunks(
        self, job: Job, meta: dict, prompt_tokens: int, params: SamplingParams, include_usage: bool, calls: bool
    ) -> AsyncIterator[dict]:
        """Chat chunks; a reply that may be tool calls is sent whole when it finishes (a call's text
        cannot be told from content before then)."""
        meta = {**meta, "object": "chat.completion.chunk"}

        def chunk(index: int, delta: dict, logprobs: Any = None, finish: str | None = None) -> dict:
            out = {
                **meta,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }
            return {**out, "usage": None} if include_usage else out

        for index in range(params.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        generated = 0
        async for event in job.events():
            if isinstance(event, Delta) and not calls:
                lp = None
                if params.logprobs is not None:
                    lp = chat_logprobs(event.logprobs, self.tokenizer.token_bytes)
                yield chunk(event.index, {"content": event.text}, lp)
            elif isinstance(event, Finished):
                generated += event.generated
                finish = event.completion.finish_reason
                if calls:
                    message, finish = chat_tools.reply(event.completion, calls)
                    lp = None
                    if params.logprobs is not None:
                        lp = chat_logprobs(event.completion.logprobs or [], self.tokenizer.token_bytes)
                    if message.get("tool_calls"):
                        delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]}
                        yield chunk(event.index, delta, lp)
                    elif message["content"]:
                        yield chunk(event.index, {"content": message["content"]}, lp)
                yield chunk(event.index, {}, None, finish)
        if include_usage:
            yield {**meta, "choices": [], "usage": usage(prompt_tokens, generated)}

    # ---- shared --------------------------------------------------------------------------------
    async def _encode(self, text: str) -> list[int]:
        ids = await asyncio.to_thread(self.tokenizer.encode, text)  # long prompts: off the event loop
        return ids or [self.tokenizer.eot_id]

    def _first_token(self, prompt: list[int]) -> str:
        return self.tokenizer.decode(prompt[:1])

    def _check_lengths(self, prompts: list[list[int]], max_tokens: int, prompt_param: str) -> None:
        if max_tokens > self.max_tokens:
            raise APIError(
                400,
                f"max_tokens={max_tokens} exceeds this server's limit of {self.max_tokens}",
                param="max_tokens",
            )
        # Scoring (max_tokens 0, echo) needs no room for a new token: the whole context may be prompt.
        limit = self.n_ctx if max_tokens == 0 and not self.limits.max_prompt_tokens else self.max_prompt_tokens
        for i, p in enumerate(prompts):
            if len(p) > limit:
                raise APIError(
                    400,
                    f"{prompt_param} ({'prompt ' + str(i) + ' ' if len(prompts) > 1 else ''}"
                    f"{len(p)} tokens) exceeds this server's limit of {limit} "
                    "prompt tokens",
                    param=prompt_param,
                )
            if len(p) + max_tokens > self.n_ctx:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.n_ctx} tokens, however you requested "
                    f"{len(p) + max_tokens} tokens ({len(p)} in your prompt; {max_tokens} for the "
                    "completion). Please reduce your prompt or completion length.",
                    param="max_tokens",
                )

    def _params(self, body: Any, max_tokens: int, logprobs: int | None) -> SamplingParams:
        n = 1 if body.n is None else body.n
        if n > self.max_n:
            raise APIError(400, f"n={n} exceeds this server's limit of {self.max_n}", param="n")
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            top_k=body.top_k or 0,
            min_p=float(body.min_p or 0.0),
            repetition_penalty=1.0 if body.repetition_penalty is None else float(body.repetition_penalty),
            presence_penalty=float(body.presence_penalty or 0.0),
            frequency_penalty=float(body.frequency_penalty or 0.0),
            n=n,
            seed=body.seed,
            logprobs=logprobs,
            logit_bias=body.logit_biases(self.vocab),
        )
        try:
            return params.validate()
        except ValueError as e:  # a combination the request models let through
            raise APIError(400, str(e)) from None

    async def _constrained(
        self, params: SamplingParams, constraint: Constraint | None, param: str = "response_format"
    ) -> SamplingParams:
        """`params` with a constraint (response_format, or tool calls), compiled now (off the event
        loop) so an invalid schema, regex or grammar is a 400 before anything is queued."""
        if constraint is None:
            return params
        try:
            await asyncio.to_thread(compile_check, constraint, self.tokenizer)
        except (ValueError, ImportError) as e:
            raise APIError(400, f"{param}: {e}", param=param) from None
        return params.updated(constraint=constraint)

    def _submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        stops: list[str],
        prompt_lp: int | None,
        stream: bool,
    ) -> Job:
        try:
            return self.engine.submit(prompts, params, stops, prompt_lp, deltas=stream)
        except QueueFull as e:
            raise APIError(
                429,
                f"the server is busy ({e}); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def _collect(self, job: Job, request: Any) -> _Results:
        """Every choice's result; cancels the job if the client disconnects first."""
        results = _Results({}, {})

        async def consume() -> None:
            async for event in job.events():
                if isinstance(event, Finished):
                    results.finished[event.index] = event
                elif isinstance(event, PromptLogprobs):
                    results.prompt_logprobs[event.prompt_index] = event.logprobs

        consumer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not consumer.done():
                raise APIError(499, "client closed the request", code="client_closed")
            try:
                consumer.result()
            except EngineError as e:
                raise APIError(500, str(e), type="server_error") from None
            return results
        finally:
            watcher.cancel()
            consumer.cancel()
            job.cancel()

    def _sse(self, job: Job, chunks: AsyncIterator[dict]) -> Any:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
                yield "data: [DONE]\n\n"
            except EngineError as e:
                yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
            finally:
                job.cancel()  # a no-op once finished; frees the slots when the client went away

        return _event_stream(body())


async def _disconnected(request: Any) -> None:
    """Returns when the client closes the connection (the body has been read, so the next ASGI
    message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _event_stream(body: AsyncIterator[str]) -> Any:
    import anyio
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        """An SSE response that notices a client going away even while nothing is being sent (queued,
        or text held back by a possible stop sequence), whatever the server's ASGI spec version."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client is gone
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return EventStream(body, media_type="text/event-stream", headers=headers)
