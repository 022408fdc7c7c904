"""The OpenAI-compatible HTTP server: routes, API key, limits and OpenAI-style errors.

Endpoints: POST /v1/completions, POST /v1/chat/completions (the ChatML template of
`gptlab.serve.chat`), GET /v1/models, GET /health, and the playground page at GET /.
Streaming answers are Server-Sent Events in OpenAI's format, ending with `data: [DONE]`.

Safe by default: `serve` binds 127.0.0.1; with an API key every /v1 call needs
`Authorization: Bearer KEY`; request bodies, prompt tokens, max_tokens, n and the number of prompts
are capped (`ServerLimits`); every error is `{"error": {"message", "type", "param", "code"}}`.
Generation runs in one `Engine` (continuous batching); a client that disconnects is cancelled.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations
# (`Request`, imported lazily inside create_app) as live objects.
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

from gptlab.serve.engine import Engine
from gptlab.serve.handlers import Handlers, ServerLimits
from gptlab.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body, model_card

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gptlab.model import GPT

log = logging.getLogger("gptlab.serve")
API_KEY_ENV = "GPTLAB_API_KEY"


def _import_fastapi():
    try:
        import fastapi
        import starlette  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"the server needs FastAPI and uvicorn: pip install 'gptlab[serve]' ({e})"
        ) from None
    return fastapi


# ---- the app ------------------------------------------------------------------------------------
def create_app(
    model: "GPT",
    tokenizer: Any,
    *,
    model_name: str = "gptlab",
    api_key: str | None = None,
    max_concurrent: int = 16,
    max_queue: int = 256,
    limits: ServerLimits | None = None,
    engine: Engine | None = None,
    kv_cache_tokens: int | None = None,
    prefix_caching: bool = True,
) -> "FastAPI":
    """A FastAPI app serving `model`; its engine thread starts and stops with the app's lifespan."""
    fastapi = _import_fastapi()
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    from gptlab.serve.playground import playground_html

    engine = engine or Engine(
        model,
        tokenizer,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        kv_cache_tokens=kv_cache_tokens,
        prefix_caching=prefix_caching,
    )
    server = Handlers(model, tokenizer, engine, model_name, limits or ServerLimits())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = fastapi.FastAPI(title="gptlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_Guard, api_key=api_key, max_body=server.limits.max_body_bytes)

    def error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, _validation_body(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error(exc.status_code, error_body(str(exc.detail), kind), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error(500, error_body(f"internal error: {type(exc).__name__}", "server_error"))

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(playground_html(model_name, model.config.n_ctx))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(model_name, server.created)]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return model_card(model_name, server.created)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await server.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await server.chat(body, request)

    return app


def _validation_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """One OpenAI error naming the parameter of the first validation error."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "invalid JSON")
        return error_body(
            f"We could not parse the JSON body of your request ({why}); send valid JSON.",
            "invalid_request_error",
        )
    loc = [p for p in first.get("loc", ()) if p != "body"]
    param = _param(loc)
    if not param:
        return error_body(
            f"the request body must be a JSON object: {first.get('msg')}", "invalid_request_error"
        )
    msgs = list(
        dict.fromkeys(
            e.get("msg", "") for e in errors if _param([p for p in e["loc"] if p != "body"]) == param
        )
    )
    return error_body(f"Invalid value for '{param}': {' or '.join(msgs)}", "invalid_request_error", param)


def _param(loc: list[Any]) -> str:
    """'messages[0].role' from a pydantic location; union member tags ('str', 'list[int]') are dropped."""
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif (
            isinstance(p, str)
            and p.isidentifier()
            and p not in {"str", "int", "float", "bool", "list", "dict"}
        ):
            out += f".{p}" if out else p
    return out


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware: the API key on /v1 and the body size cap, checked before anything is parsed."""

    def __init__(self, app: Any, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                body = error_body(
                    "Incorrect or missing API key. Send it as the header 'Authorization: Bearer YOUR_KEY'.",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                )
                return await _send_json(send, 401, body)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _send_json(send, 413, self._too_large())
        received, started = 0, False

        async def guarded_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _send_json(send, 413, self._too_large())

    def _too_large(self) -> dict[str, Any]:
        return error_body(
            f"request body exceeds {self.max_body} bytes", "invalid_request_error", None, "request_too_large"
        )


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


# ---- serving -------------------------------------------------------------------------------------
@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread (tests, notebooks, benchmarks); yields its base
    URL (`http://127.0.0.1:PORT`, a free port when port=0) and shuts it down on exit."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="gptlab-uvicorn", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.01)
    try:
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def default_threads(available: int) -> int:
    """Torch threads for a CPU server: all cores but one. The event loop (HTTP parsing, tokenising,
    streaming) needs a core of its own; if the matmul threads take them all, each decode step waits
    on whichever thread the event loop preempted (measured on 2 cores, 32 concurrent clients: 1 thread
    served 1.13x the tokens/s of 2)."""
    return max(1, available - 1)


def serve(
    checkpoint: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_concurrent: int = 16,
    max_queue: int = 256,
    model_name: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    limits: ServerLimits | None = None,
    log_level: str = "info",
    threads: int | None = None,
    quantize: str | None = None,
    kv_cache_tokens: int | None = None,
    prefix_caching: bool = True,
) -> None:
    """Load `checkpoint` (and its tokenizer) and serve it with uvicorn until interrupted. On CPU the
    linear layers run on gptlab's decoding kernels (`generate.prepare_model`; quantize='int8': int8)."""
    _import_fastapi()
    import torch
    import uvicorn

    from gptlab.checkpoint import load_model, load_tokenizer
    from gptlab.infer.prepare import prepare_model

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif device == "cpu":
        torch.set_num_threads(default_threads(torch.get_num_threads()))
    torch_dtype = None
    if dtype is not None:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    model = load_model(checkpoint, device=device, dtype=torch_dtype)
    if quantize is not None and device != "cpu":
        raise ValueError(f"--quantize {quantize} runs on CPU; drop it or use --device cpu")
    if device == "cpu":
        prepare_model(model, quantize=quantize)
    tokenizer = load_tokenizer(checkpoint)
    name = model_name or os.path.basename(os.path.normpath(str(checkpoint)))
    app = create_app(
        model,
        tokenizer,
        model_name=name,
        api_key=api_key,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        limits=limits,
        kv_cache_tokens=kv_cache_tokens,
        prefix_caching=prefix_caching,
    )
    kv = app.state.server.engine.stats()["kv_cache"]
    print(
        f"gptlab: KV cache of {kv['blocks_total'] * kv['block_size']:,} tokens ({kv['blocks_total']} blocks of "
        f"{kv['block_size']}, {kv['blocks_total'] * kv['bytes_per_block'] / 2**20:,.0f} MiB {kv['kv_dtype']}), "
        f"prefix caching {'on' if prefix_caching else 'off'}",
        flush=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it (--api-key)", host)
    print(f"gptlab: serving {name!r} on http://{host}:{port} (playground at /, API at /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
