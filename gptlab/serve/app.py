"""The OpenAI-compatible HTTP server: routes, API key, limits and OpenAI-style errors.

Endpoints: POST /v1/completions, POST /v1/chat/completions (the ChatML template of
`gptlab.serve.chat`), POST /v1/embeddings (`gptlab.infer.embed`), GET /v1/models, POST /tokenize and
/detokenize (vLLM's and llama.cpp's names), GET /health, GET /metrics (Prometheus) and the playground
page at GET /. Streaming answers are Server-Sent Events in OpenAI's format, ending with `data: [DONE]`.

Safe by default: `serve` binds 127.0.0.1; with an API key every /v1 call, /tokenize, /detokenize and
/metrics need `Authorization: Bearer KEY` (and /health without it says only that the server is up); requests must
name this server in `Host` (`gptlab.serve.guard`: no DNS rebinding), no cross-origin page may read
answers unless `cors_origins` names it; bodies are `application/json` with finite numbers and valid
Unicode (`gptlab.serve.body`); request bodies, prompt tokens, max_tokens, n and the number of prompts
are capped (`ServerLimits`), and so are connections (`ConnectionLimits`: slow clients, idle ones,
how many); every error is `{"error": {"message", "type", "param", "code"}}` with an `x-request-id`
header, logged, and leaves a keep-alive connection usable.
Generation runs in one `Engine` (continuous batching); a client that disconnects is cancelled.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations
# (`Request`, imported lazily inside create_app) as live objects.
import errno
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

from gptlab.serve.body import parse_body, validation_error
from gptlab.serve.connections import ConnectionLimits, uvicorn_options
from gptlab.serve.engine import Engine
from gptlab.serve.guard import (
    REQUEST_ID_HEADER,
    Guard,
    HTTPStats,
    RequestIds,
    cors_middleware,
    key_matches,
    server_names,
)
from gptlab.serve.handlers import Handlers, ServerLimits
from gptlab.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    error_body,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gptlab.infer.speculative import Speculation
    from gptlab.model import GPT

log = logging.getLogger("gptlab.serve")
API_KEY_ENV = "GPTLAB_API_KEY"


def _import_fastapi():
    try:
        import fastapi
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"the server needs FastAPI, uvicorn and prometheus_client: pip install 'gptlab[serve]' ({e})"
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
    allowed_hosts: Iterable[str] = (),
    cors_origins: Iterable[str] = (),
    speculation: "Speculation | None" = None,
) -> "FastAPI":
    """A FastAPI app serving `model`; its engine thread starts and stops with the app's lifespan.

    `allowed_hosts`: names a request's `Host` may give besides IP literals and localhost ('*': any).
    `cors_origins`: origins (`https://example.com`, or '*') whose pages may call the API from a browser.
    `speculation`: decode with speculative decoding (a draft model or prompt lookup).
    """
    fastapi = _import_fastapi()
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException

    from gptlab.serve.playground import playground_html

    engine = engine or Engine(
        model,
        tokenizer,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        kv_cache_tokens=kv_cache_tokens,
        prefix_caching=prefix_caching,
        speculation=speculation,
    )
    server = Handlers(model, tokenizer, engine, model_name, limits or ServerLimits())
    from gptlab.serve.metrics import CONTENT_TYPE, ENDPOINTS, Metrics

    stats = HTTPStats(ENDPOINTS)
    registry = Metrics(engine.stats, stats, model_name)
    engine.observer = registry

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = fastapi.FastAPI(title="gptlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    hosts = frozenset(h.strip().lower().rstrip(".") for h in allowed_hosts)
    # add_middleware puts each in front of the last: RequestIds -> CORS (if any) -> Guard -> the routes
    app.add_middleware(Guard, api_key=api_key, max_body=server.limits.max_body_bytes, allowed_hosts=hosts)
    origins = list(cors_origins)
    if origins:
        app.add_middleware(
            cors_middleware(),
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=[REQUEST_ID_HEADER],
            max_age=600,
        )
    app.add_middleware(RequestIds, stats=stats)

    class ErrorResponse(JSONResponse):
        def render(self, content: Any) -> bytes:
            return json.dumps(content).encode()  # ASCII: a message may quote any string, surrogates too

    def error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
        return ErrorResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, validation_error(list(exc.errors())).body())

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error(exc.status_code, error_body(str(exc.detail), kind), getattr(exc, "headers", None))

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(playground_html(model_name, model.config.n_ctx))

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if api_key and not key_matches(request.headers.get("authorization"), api_key):
            return {"status": "ok"}  # the counters only for those holding the key
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/metrics")
    async def metrics() -> Response:  # the Guard asks for the key
        return Response(registry.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return server.model_card()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        body = parse_body(request.headers.get("content-type"), await request.body(), EmbeddingRequest)
        return await server.embeddings(body)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = parse_body(request.headers.get("content-type"), await request.body(), TokenizeRequest)
        return await server.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = parse_body(request.headers.get("content-type"), await request.body(), DetokenizeRequest)
        return server.detokenize(body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = parse_body(request.headers.get("content-type"), await request.body(), CompletionRequest)
        return await server.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = parse_body(request.headers.get("content-type"), await request.body(), ChatCompletionRequest)
        return await server.chat(body, request)

    return app


# ---- serving -------------------------------------------------------------------------------------
@contextmanager
def serve_in_thread(
    app: Any, host: str = "127.0.0.1", port: int = 0, connections: ConnectionLimits | None = None
) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread (tests, notebooks, benchmarks); yields its base
    URL (`http://127.0.0.1:PORT`, a free port when port=0) and shuts it down on exit."""
    import threading
    import time

    import uvicorn

    sock = bind_socket(host, port)
    options = uvicorn_options(connections or ConnectionLimits())
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gptlab-uvicorn", daemon=True)
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


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to (host, port), or a ValueError saying why not in one line
    (a busy port above all), before anything is loaded or announced."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, or asyncio does not set TCP_NODELAY on the accepted connections (it checks the
    # proto), and each response written in two parts waits for a delayed ACK: 40 ms a request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            why = f"port {port} is already in use on {host} (another server?); pick another with --port"
        elif e.errno == errno.EACCES:
            why = f"no permission to listen on port {port} (ports below 1024 need root); pick another with --port"
        elif e.errno in (errno.EADDRNOTAVAIL, socket.EAI_NONAME) or isinstance(e, socket.gaierror):
            why = f"cannot listen on {host!r}: not an address of this machine (--host)"
        else:
            why = f"cannot listen on {host}:{port}: {e.strerror or e}"
        raise ValueError(why) from None
    return sock


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
    connections: ConnectionLimits | None = None,
    allowed_hosts: Iterable[str] = (),
    cors_origins: Iterable[str] = (),
    draft: str | None = None,
    prompt_lookup: int = 0,
    speculative_tokens: int | None = None,
) -> None:
    """Load `checkpoint` (and its tokenizer) and serve it with uvicorn until interrupted. On CPU the
    linear layers run on gptlab's decoding kernels (`generate.prepare_model`; quantize='int8': int8).

    `Host` may name the server by IP, localhost, `host` when it is a name, the machine's own names
    when `host` is a wildcard (0.0.0.0, ::), or any of `allowed_hosts`.

    Speculative decoding: `draft` (a smaller checkpoint with the same tokenizer, loaded like the target)
    or `prompt_lookup` n-grams, `speculative_tokens` (K) drafted per step."""
    _import_fastapi()
    import torch
    import uvicorn

    from gptlab.checkpoint import load_model, load_tokenizer
    from gptlab.infer.prepare import prepare_model

    sock = bind_socket(host, port)  # a busy port fails here, before minutes of loading
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    connections = connections or ConnectionLimits()
    if not log.handlers and not logging.getLogger().handlers:  # error lines with request ids, beside uvicorn's
        from uvicorn.logging import DefaultFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s gptlab: %(message)s", use_colors=False))
        log.addHandler(handler)
        log.setLevel(getattr(logging, log_level.upper(), logging.DEBUG))  # uvicorn's 'trace': debug
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
    speculation = None
    if draft is not None or prompt_lookup:
        from gptlab.infer.speculative import Speculation

        draft_model = load_model(draft, device=device, dtype=torch_dtype) if draft is not None else None
        if draft_model is not None and device == "cpu":
            prepare_model(draft_model, quantize=quantize)
        k = speculative_tokens if speculative_tokens is not None else Speculation.num_tokens
        speculation = Speculation(draft=draft_model, prompt_lookup=prompt_lookup, num_tokens=k).validate(model)
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
        allowed_hosts=[*server_names(host), *allowed_hosts],
        cors_origins=cors_origins,
        speculation=speculation,
    )
    kv = app.state.server.engine.stats()["kv_cache"]
    print(
        f"gptlab: KV cache of {kv['blocks_total'] * kv['block_size']:,} tokens ({kv['blocks_total']} blocks of "
        f"{kv['block_size']}, {kv['blocks_total'] * kv['bytes_per_block'] / 2**20:,.0f} MiB {kv['kv_dtype']}), "
        f"prefix caching {'on' if prefix_caching else 'off'}",
        flush=True,
    )
    if speculation is not None:
        spec = app.state.server.engine.stats()["speculative"]
        print(f"gptlab: speculative decoding: {spec['drafter']}, K = {spec['num_tokens']}", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it (--api-key)", host)
    print(f"gptlab: serving {name!r} on http://{host}:{port} (playground at /, API at /v1)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, **uvicorn_options(connections))).run(sockets=[sock])
