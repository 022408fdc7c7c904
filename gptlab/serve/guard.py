"""The ASGI layers in front of every route: request ids and the last word on errors (`RequestIds`),
then CORS when configured, then the Host check, the API key and the body cap (`Guard`).

Every response carries an `x-request-id` header, and every error response (4xx/5xx) is logged with
it, its method, path and message. An exception nothing else handled becomes a 500 in OpenAI's JSON
shape here, inside the app, so the connection stays usable (Starlette's own last-resort handler
re-raises to the server, which then closes the connection). CORS sits between the two, so that a
page on an allowed origin can read the Guard's errors too.

The Host check stops DNS rebinding: a web page on `evil.example` whose name is re-pointed at
127.0.0.1 can reach a local server, but its requests still say `Host: evil.example`. Accepted:
IP literals (a page can only be *at* an IP by being served from it), `localhost`, and the names
passed as `allowed_hosts` ('*': any).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import uuid
from collections import Counter
from typing import Any

from gptlab.serve.protocol import error_body

log = logging.getLogger("gptlab.serve")
REQUEST_ID_HEADER = "x-request-id"
_LOGGED_BODY = 4096  # bytes of an error body kept to log its message


class HTTPStats:
    """Responses sent, by status code and by (endpoint, status) (read by /metrics); `endpoints` are the
    paths that get a label of their own, any other counts as 'other'."""

    def __init__(self, endpoints: frozenset[str] = frozenset()) -> None:
        self.endpoints = endpoints
        self.by_endpoint: Counter[tuple[str, int]] = Counter()

    def count(self, path: str, status: int) -> None:
        self.by_endpoint[path if path in self.endpoints else "other", status] += 1

    @property
    def responses(self) -> Counter[int]:
        """Responses by status code alone."""
        out: Counter[int] = Counter()
        for (_, status), n in self.by_endpoint.items():
            out[status] += n
        return out


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex[:24]


def key_matches(authorization: str | None, api_key: str) -> bool:
    """Whether an `Authorization` header value is `Bearer <api_key>` (compared in constant time)."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def host_allowed(host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a `Host` header value names this server: see the module docstring."""
    if host is None or "*" in allowed:  # no Host at all is HTTP/1.0, which no browser sends
        return True
    host = host.strip().lower()
    if _is_ip(host):
        return True
    if host.startswith("["):  # [::1]:8000
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            name = host
    name = name.rstrip(".")
    return _is_ip(name) or name == "localhost" or name in allowed


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def server_names(bind_host: str) -> list[str]:
    """Names a client may give in `Host` for a server bound to `bind_host`, besides IP literals and
    localhost: the host itself when it is a name, the machine's names when it is a wildcard."""
    import socket

    if bind_host in ("", "0.0.0.0", "::"):
        return [socket.gethostname(), socket.getfqdn()]
    return [] if _is_ip(bind_host.strip("[]")) else [bind_host]


def is_protected(path: str) -> bool:
    """Paths that need the API key when one is set (/health answers either way, with less)."""
    return path.startswith("/v1") or path in ("/metrics", "/tokenize", "/detokenize")


class _BodyTooLarge(Exception):
    pass


class RequestIds:
    """ASGI middleware, outermost: a request id on every response, each error logged with it, and the
    last word on exceptions (a JSON 500 while no response has started)."""

    def __init__(self, app: Any, *, stats: HTTPStats) -> None:
        from starlette.requests import ClientDisconnect

        self.app, self.stats, self.client_disconnect = app, stats, ClientDisconnect

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        started, status, error_bytes = False, 0, bytearray()

        async def tracked_send(message: dict) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
                self.stats.count(scope.get("path", ""), status)
            elif message["type"] == "http.response.body" and status >= 400:
                error_bytes.extend(message.get("body", b"")[: _LOGGED_BODY - len(error_bytes)])
                if not message.get("more_body"):
                    _log_error(scope, rid, status, bytes(error_bytes))
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except self.client_disconnect:
            log.info("%s: the client left before sending its whole request", rid)
        except Exception as e:
            log.exception("%s %s %r: unhandled error", rid, scope.get("method"), scope.get("path"))
            if started:
                raise  # the response is half sent: the server has to close the connection
            await send_json(tracked_send, 500, error_body(f"internal error: {type(e).__name__}", "server_error"))


class Guard:
    """ASGI middleware in front of the routes: the Host check, the API key and the body cap, before
    anything is parsed. `allowed_hosts` are lowercase names."""

    def __init__(self, app: Any, *, api_key: str | None, max_body: int, allowed_hosts: frozenset[str]) -> None:
        self.app, self.api_key, self.max_body, self.allowed_hosts = app, api_key, max_body, allowed_hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host")
        if not host_allowed(None if host is None else host.decode("latin-1"), self.allowed_hosts):
            body = error_body(
                f"Host {host.decode('latin-1')!r} is not a name of this server; start it with --allowed-host "
                "NAME to accept it",
                "invalid_request_error",
                None,
                "invalid_host",
            )
            return await send_json(send, 400, body)
        if self.api_key and is_protected(scope["path"]):
            if not key_matches(headers.get(b"authorization", b"").decode("latin-1"), self.api_key):
                body = error_body(
                    "Incorrect or missing API key. Send it as the header 'Authorization: Bearer YOUR_KEY'.",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                )
                return await send_json(send, 401, body)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await send_json(send, 413, self._too_large())
        received, started = 0, False

        async def guarded_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # a chunked body, whose length no header declared
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
                await send_json(send, 413, self._too_large())

    def _too_large(self) -> dict[str, Any]:
        return error_body(
            f"request body exceeds {self.max_body} bytes", "invalid_request_error", None, "request_too_large"
        )


def cors_middleware() -> type:
    """Starlette's CORSMiddleware, its refusals of preflight requests in OpenAI's error shape."""
    from starlette.middleware.cors import CORSMiddleware
    from starlette.responses import Response

    class JSONCORSMiddleware(CORSMiddleware):
        def preflight_response(self, request_headers: Any) -> Response:
            response = super().preflight_response(request_headers)
            if response.status_code < 400:
                return response
            why = bytes(response.body).decode()  # "Disallowed CORS origin, headers"
            data = json.dumps(error_body(f"{why}: see the server's --cors-origin", "invalid_request_error")).encode()
            headers = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
            return Response(data, response.status_code, headers, media_type="application/json")

    return JSONCORSMiddleware


async def send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    """A whole JSON response (ASCII-escaped: an error's message may quote any string)."""
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _log_error(scope: dict, rid: str, status: int, body: bytes) -> None:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    level = logging.ERROR if status >= 500 else logging.INFO
    log.log(level, "%s %s %r -> %d: %s", rid, scope.get("method"), scope.get("path"), status, message)
