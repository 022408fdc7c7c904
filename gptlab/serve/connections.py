"""Connection limits, enforced in uvicorn's HTTP/1.1 protocol (h11): what a slow or greedy client
may hold.

uvicorn closes a connection idle between requests after `timeout_keep_alive`, but nothing bounds
the time a client takes to send a request: a client sending its headers a byte at a time (slow-loris)
holds its connection, and a new connection that sends nothing at all is held too. Here a request
must arrive whole (headers and body) within `read_timeout` seconds of its first byte (a new
connection: of connecting), else the client gets a 408 and the connection is closed. Beyond
`max_connections` open connections a new one is answered 503 and closed. The errors uvicorn writes
itself (a malformed request: 400) are in OpenAI's JSON shape like the app's.

So the server runs uvicorn's h11 protocol even where the faster httptools parser is installed: parsing
is a small share of a request that generates tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("gptlab.serve")


@dataclass
class ConnectionLimits:
    """What one client connection may hold."""

    keep_alive_timeout: float = 5.0
    """Seconds an idle keep-alive connection is kept between requests (uvicorn's default)."""
    read_timeout: float = 30.0
    """Seconds a client has to send a whole request, headers and body, from its first byte (on a new
    connection: from connecting); then it gets a 408 and the connection is closed."""
    max_connections: int = 512
    """Open connections; one more is answered 503 and closed. Each queued request holds one."""

    def __post_init__(self) -> None:
        for name in ("keep_alive_timeout", "read_timeout"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")


def uvicorn_options(limits: ConnectionLimits) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` that enforce `limits`."""
    # ws='none': the API has no WebSocket routes, so an Upgrade request is answered as plain HTTP
    return {"http": http_protocol(limits), "ws": "none", "timeout_keep_alive": limits.keep_alive_timeout}


def http_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with `limits` enforced (a class per limits: uvicorn builds protocols from
    its config alone)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from gptlab.serve.guard import REQUEST_ID_HEADER, new_request_id
    from gptlab.serve.protocol import error_body

    def logged(client: Any, status: int, body: dict[str, Any]) -> tuple[bytes, bytes]:
        """(request id, JSON) of an error answered here, logged like the app's errors."""
        rid = new_request_id()
        level = logging.ERROR if status >= 500 else logging.INFO
        log.log(level, "%s from %s -> %d: %s", rid, client, status, body["error"]["message"])
        return rid.encode(), json.dumps(body).encode()

    def raw_response(client: Any, status: int, reason: str, body: dict[str, Any]) -> bytes:
        """A whole response to write to the transport directly, outside h11's state machine."""
        rid, data = logged(client, status, body)
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
            f"connection: close\r\n{REQUEST_ID_HEADER}: {rid.decode()}\r\n\r\n"
        )
        return head.encode() + data

    def over_capacity(client: Any) -> Any:
        """An ASGI app answering every request 503 (and closing the connection)."""

        async def app(scope: dict, receive: Any, send: Any) -> None:
            message = f"the server holds its limit of {limits.max_connections} open connections; retry shortly"
            rid, data = logged(client, 503, error_body(message, "server_error", None, "too_many_connections"))
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"connection", b"close"),
                (b"retry-after", b"1"),
                (REQUEST_ID_HEADER.encode(), rid),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": data})

        return app

    class LimitedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.read_deadline: asyncio.TimerHandle | None = None
            if len(self.connections) > limits.max_connections:
                self.app = over_capacity(self.client)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            # A request h11 cannot parse: answered like every other error, then closed (its framing is lost).
            body = error_body(f"{msg} It is not valid HTTP/1.1.", "invalid_request_error", None, "invalid_http")
            self.transport.write(raw_response(self.client, 400, "Bad Request", body))
            self.transport.close()

        def _watch(self) -> None:
            """The clock runs while a request is partly received: headers begun, or a body to come."""
            state = self.conn.their_state
            if state is h11.SEND_BODY or (state is h11.IDLE and self.conn.trailing_data[0]):
                self._arm()
            else:
                self._disarm()

        def _arm(self) -> None:
            if self.read_deadline is None and not self.transport.is_closing():
                self.read_deadline = self.loop.call_later(limits.read_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self.read_deadline is not None:
                self.read_deadline.cancel()
                self.read_deadline = None

        def _timed_out(self) -> None:
            self.read_deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle if self.conn.their_state is h11.SEND_BODY else None
            if cycle is None or not cycle.response_started:
                body = error_body(
                    f"the request did not arrive whole within {limits.read_timeout:g} s",
                    "invalid_request_error",
                    None,
                    "request_timeout",
                )
                self.transport.write(raw_response(self.client, 408, "Request Timeout", body))
            if cycle is not None:
                cycle.disconnected = True  # the app, waiting for the rest of the body, sees the client leave
                cycle.message_event.set()
            self.transport.close()

    return LimitedH11Protocol
