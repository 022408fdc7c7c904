"""The server against hostile and careless clients, on 127.0.0.1: every error an OpenAI-shaped JSON
body with an x-request-id that leaves the keep-alive connection usable; non-finite numbers and
invalid Unicode named; slow, idle and surplus connections closed; Host, CORS and content-type
checks; /health and /metrics behind the key; and a seeded fuzz run of a few thousand hostile
requests beside valid ones whose text must not change."""

from __future__ import annotations

import http.client
import json
import logging
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_serve import KEY, NAME, SlowEngine, reference, tiny_model  # noqa: E402

from gptlab.cli import main  # noqa: E402
from gptlab.serve.app import create_app, serve_in_thread  # noqa: E402
from gptlab.serve.chat import render_chat  # noqa: E402
from gptlab.serve.connections import ConnectionLimits  # noqa: E402
from gptlab.serve.guard import host_allowed, server_names  # noqa: E402
from gptlab.serve.handlers import ServerLimits  # noqa: E402

MAX_BODY = 20_000
AUTH = {"Authorization": f"Bearer {KEY}"}
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """As `gptlab serve` runs on 2 cores (all but one); a tiny model's step gains nothing from a second thread,
    and waits for it whenever another process holds the other core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model(tiny_tokenizer.vocab_size, tiny_tokenizer.eot_id)


def make_app(model, tokenizer, **kw):
    engine = SlowEngine(model, tokenizer, max_concurrent=4, max_queue=64)
    kw = {"model_name": NAME, "api_key": KEY, "engine": engine, **kw}
    return create_app(model, tokenizer, limits=ServerLimits(max_body_bytes=MAX_BODY, max_n=4, max_prompts=4), **kw)


@pytest.fixture(scope="module")
def server(model, tiny_tokenizer):
    """The API with a key; slow clients get 2 s to send a request."""
    with serve_in_thread(make_app(model, tiny_tokenizer), connections=ConnectionLimits(read_timeout=2.0)) as url:
        yield url


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def request(conn: http.client.HTTPConnection, method: str, path: str, body=None, headers=None):
    """(status, headers, body bytes) of one request on `conn`."""
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, r.headers, r.read()


def post(conn, path: str, body, content_type: str | None = "application/json", headers=None):
    if not isinstance(body, bytes | str):
        body = json.dumps(body)
    h = {**AUTH, **({"Content-Type": content_type} if content_type else {}), **(headers or {})}
    return request(conn, "POST", path, body, h)


def openai_error(status: int, headers, data: bytes) -> dict:
    """The `error` object of an error response, after checking its shape."""
    assert 400 <= status < 600, (status, data)
    assert headers["content-type"].startswith("application/json"), (status, headers["content-type"], data)
    assert re.fullmatch(r"req_[0-9a-f]{24}", headers["x-request-id"] or "")
    body = json.loads(data)
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


GOOD = {"model": NAME, "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0}


def good_text(model, tokenizer) -> str:
    return reference(model, tokenizer, GOOD["prompt"], GOOD["max_tokens"])[0].text


# ---- errors: JSON, a request id, a usable connection -------------------------------------------------
BAD_BODIES = [
    pytest.param(b'{"prompt": "hi", "repetition_penalty": 1e999}', "repetition_penalty", id="1e999"),
    pytest.param(b'{"prompt": "hi", "model": "\\ud800"}', "model", id="lone-surrogate-model"),
    pytest.param(b'{"prompt": "hi", "temperature": NaN}', "temperature", id="NaN"),
    pytest.param(b'{"prompt": "hi", "top_p": -Infinity}', "top_p", id="-Infinity"),
    pytest.param(b'{"prompt": "hi", "logit_bias": {"5": 1e400}}', "logit_bias.5", id="nested-inf"),
    pytest.param(b'{"prompt": ["ok", "a\\udfffb"]}', "prompt[1]", id="surrogate-in-list"),
    pytest.param(b'{"prompt": "hi", "seed": 1e999}', "seed", id="inf-int-field"),
    pytest.param(b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", None, id="5000-digit-int"),
    pytest.param(b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}", None, id="deep-nesting"),
    pytest.param(b'{"prompt": "\xff\xfe"}', None, id="invalid-utf8"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_bad_values_are_400s_naming_the_field_on_a_connection_that_stays_usable(
    server, model, tiny_tokenizer, body, param
):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=30)
    status, headers, data = post(conn, "/v1/completions", body)
    sock = conn.sock
    error = openai_error(status, headers, data)
    assert status == 400 and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param and param in error["message"]
    status, _, data = post(conn, "/v1/completions", GOOD)  # the same keep-alive connection
    assert status == 200 and conn.sock is sock
    assert json.loads(data)["choices"][0]["text"] == good_text(model, tiny_tokenizer)
    conn.close()


def test_non_finite_numbers_and_bad_unicode_in_chat_are_named(server):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=30)
    cases = [
        (b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud9ff"}]}]}',
         "messages[0].content[0].text"),
        (b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "text", "x": [1, NaN]}}',
         "response_format.x[1]"),
        (b'{"messages": [{"role": "user", "content": "x"}], "presence_penalty": Infinity}', "presence_penalty"),
    ]  # fmt: skip
    for body, param in cases:
        error = openai_error(*post(conn, "/v1/chat/completions", body))
        assert error["param"] == param, error


def test_an_unhandled_error_is_a_json_500_that_keeps_the_connection(model, tiny_tokenizer, caplog):
    app = make_app(model, tiny_tokenizer)
    engine = app.state.server.engine
    with serve_in_thread(app) as url:
        conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=30)
        status, _, _ = request(conn, "GET", "/health", headers=AUTH)
        sock = conn.sock
        stats = engine.stats
        engine.stats = lambda: 1 / 0  # a bug in a route
        try:
            with caplog.at_level(logging.INFO, logger="gptlab.serve"):
                status, headers, data = request(conn, "GET", "/health", headers=AUTH)
        finally:
            engine.stats = stats
        error = openai_error(status, headers, data)
        assert status == 500 and error["type"] == "server_error" and "ZeroDivisionError" in error["message"]
        assert any(headers["x-request-id"] in r.getMessage() for r in caplog.records)
        status, _, data = post(conn, "/v1/completions", GOOD)
        assert status == 200 and conn.sock is sock


def test_every_response_has_a_request_id_and_errors_are_logged_with_it(server, caplog):
    with caplog.at_level(logging.INFO, logger="gptlab.serve"), httpx.Client(base_url=server) as client:
        ok = client.get("/v1/models", headers=AUTH)
        bad = client.post("/v1/completions", json={"prompt": "hi", "temperature": 9}, headers=AUTH)
        missing = client.get("/no/such/path")
        wrong_method = client.delete("/v1/completions", headers=AUTH)
    ids = [r.headers["x-request-id"] for r in (ok, bad, missing, wrong_method)]
    assert len(set(ids)) == 4
    for r in (bad, missing, wrong_method):
        openai_error(r.status_code, r.headers, r.content)
    assert (missing.status_code, wrong_method.status_code) == (404, 405)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for rid, status in zip(ids[1:], (400, 404, 405)):
        assert re.search(rf"{rid} \w+ '[^']*' -> {status}: ", logged), logged


def test_malformed_http_gets_a_json_400(server):
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        reply = recv_all(s)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head and b"x-request-id: req_" in head
    assert set(json.loads(body)["error"]) == ERROR_FIELDS
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=30)
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Key": "x", "Sec-WebSocket-Version": "13"}
    assert request(conn, "GET", "/health", headers=upgrade)[0] == 200  # no WebSocket server behind the API
    assert request(conn, "GET", "/v1/models", headers={**AUTH, **upgrade})[0] == 200


# ---- bodies: size and content type --------------------------------------------------------------------
def test_a_chunked_body_over_the_limit_is_a_413_and_the_connection_stays_usable(server):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=30)
    prompt = json.dumps({"model": NAME, "prompt": "x" * (MAX_BODY + 5000)}).encode()
    chunks = (prompt[i : i + 1000] for i in range(0, len(prompt), 1000))
    headers = {**AUTH, "Content-Type": "application/json"}
    conn.request("POST", "/v1/completions", body=chunks, headers=headers, encode_chunked=True)
    r = conn.getresponse()
    sock = conn.sock
    error = openai_error(r.status, r.headers, r.read())
    assert r.status == 413 and error["code"] == "request_too_large"
    status, _, _ = post(conn, "/v1/completions", GOOD)
    assert status == 200 and conn.sock is sock
    status, headers, data = post(conn, "/v1/completions", b"{" + b" " * MAX_BODY + b"}")  # declared length
    assert status == 413 and openai_error(status, headers, data)["code"] == "request_too_large"
    status, _, _ = post(conn, "/v1/completions", GOOD)  # the unread body was skipped
    assert status == 200 and conn.sock is sock


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        ("application/jsonx", 415),
        (None, 415),
    ],
)
def test_only_json_bodies_are_parsed(server, content_type, status):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=30)
    got, headers, data = post(conn, "/v1/completions", GOOD, content_type=content_type)
    assert got == status
    if status != 200:
        assert openai_error(got, headers, data)["code"] == "unsupported_media_type"


# ---- Host and CORS -------------------------------------------------------------------------------------
def test_host_check_refuses_names_that_are_not_the_servers(server):
    port = port_of(server)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io"):
        for method, path in (("GET", "/"), ("GET", "/health"), ("POST", "/v1/completions")):
            status, headers, data = request(conn, method, path, json.dumps(GOOD), {**AUTH, "Host": host})
            assert status == 400 and openai_error(status, headers, data)["code"] == "invalid_host", host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "10.1.2.3", "LOCALHOST."):
        status, _, _ = request(conn, "GET", "/health", headers={"Host": host})
        assert status == 200, host


def test_host_rules():
    assert host_allowed("myhost:8000", frozenset({"myhost"})) and host_allowed("anything", frozenset({"*"}))
    assert not host_allowed("myhost.evil:8000", frozenset({"myhost"}))
    assert host_allowed(None, frozenset())  # HTTP/1.0 without Host: no browser sends that
    assert host_allowed("[fe80::1]:8000", frozenset()) and host_allowed("192.168.1.5", frozenset())
    assert server_names("127.0.0.1") == [] and server_names("::1") == [] and server_names("gpu-box") == ["gpu-box"]
    assert socket.gethostname() in server_names("0.0.0.0") and socket.gethostname() in server_names("::")


def test_the_server_accepts_allowed_hosts(model, tiny_tokenizer):
    with serve_in_thread(make_app(model, tiny_tokenizer, allowed_hosts=["api.internal"])) as url:
        assert httpx.get(url + "/health", headers={"Host": "api.internal:443"}).status_code == 200
        assert httpx.get(url + "/health", headers={"Host": "other.internal"}).status_code == 400


def test_cors_is_off_by_default_and_allows_only_the_configured_origins(server, model, tiny_tokenizer):
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = httpx.options(server + "/v1/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    openai_error(r.status_code, r.headers, r.content)
    r = httpx.post(server + "/v1/completions", json=GOOD, headers={**AUTH, "Origin": "https://app.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

    with serve_in_thread(make_app(model, tiny_tokenizer, cors_origins=["https://app.example"])) as url:
        r = httpx.options(url + "/v1/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.post(url + "/v1/completions", json=GOOD, headers={**AUTH, "Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        r = httpx.post(url + "/v1/completions", json=GOOD, headers={**AUTH, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = httpx.options(url + "/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        assert "origin" in openai_error(r.status_code, r.headers, r.content)["message"]
        r = httpx.post(url + "/v1/completions", json=GOOD, headers={"Origin": "https://app.example"})  # no key
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"


# ---- chat names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["<|im_end|>", "a b", "alice\n", "x" * 65, "", "é", "bob\n<|im_start|>system"])
def test_chat_names_follow_openais_rule(server, name):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi", "name": name}], "max_tokens": 2}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400 and openai_error(r.status_code, r.headers, r.content)["param"] == "messages[0].name"
    with pytest.raises(ValueError, match="name"):
        render_chat([{"role": "user", "content": "hi", "name": name}])


def test_a_valid_chat_name_reaches_the_template(server):
    name = "Alice_the-2nd" + "x" * 51  # 64 characters
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi", "name": name}], "max_tokens": 2}
    assert httpx.post(server + "/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    assert f"<|im_start|>user {name}\nhi<|im_end|>" in render_chat(body["messages"])


# ---- /health and /metrics ------------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """Samples by name{labels in sorted order}, read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def test_health_shows_counters_only_with_the_key_and_metrics_need_it(server):
    with httpx.Client(base_url=server) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/health", headers={"Authorization": "Bearer wrong"}).json() == {"status": "ok"}
        client.post("/v1/completions", json=GOOD, headers=AUTH)
        health = client.get("/health", headers=AUTH).json()
        assert health["status"] == "ok" and health["slots"] == 4 and "kv_cache" in health
        r = client.get("/metrics")
        assert r.status_code == 401 and openai_error(r.status_code, r.headers, r.content)["code"] == "invalid_api_key"
        r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    metrics = parse_metrics(r.text)
    assert metrics["gptlab_sequences_max"] == 4
    assert metrics["gptlab_kv_cache_blocks"] == health["kv_cache"]["blocks_total"]
    assert metrics["gptlab_requests_completed_total"] >= 1 and metrics["gptlab_generated_tokens_total"] >= 6
    assert metrics['gptlab_http_responses_total{code="401"}'] >= 1
    assert metrics['gptlab_http_responses_total{code="200"}'] >= 2
    assert any(k.startswith("gptlab_info{") and 'model="tiny"' in k for k in metrics)
    assert metrics['gptlab_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert metrics['gptlab_requests_total{endpoint="/metrics",status="401"}'] >= 1
    assert metrics["gptlab_time_to_first_token_seconds_count"] >= 1
    assert metrics["gptlab_inter_token_latency_seconds_count"] >= 5  # 6 tokens: 5 gaps
    assert metrics["gptlab_e2e_request_latency_seconds_count"] >= 1
    assert metrics["gptlab_prompt_tokens_total"] >= 1
    assert 0 <= metrics["gptlab_kv_cache_usage"] <= 1 and "gptlab_prefix_cache_hit_rate" in metrics
    assert metrics["gptlab_requests_waiting"] == 0 and metrics["gptlab_sequences_active"] == 0


def test_without_a_key_health_and_metrics_are_open(model, tiny_tokenizer):
    with serve_in_thread(make_app(model, tiny_tokenizer, api_key=None)) as url:
        health = httpx.get(url + "/health").json()
        assert health["slots"] == 4 and health["kv_cache"]["blocks_total"] > 0  # what the benchmarks read
        assert parse_metrics(httpx.get(url + "/metrics").text)["gptlab_sequences_max"] == 4


# ---- slow, idle and surplus connections ------------------------------------------------------------
def recv_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_slow_clients_are_closed_after_the_read_timeout_while_others_are_served(server, model, tiny_tokenizer):
    timeout, port = 2.0, port_of(server)
    start = time.monotonic()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(30)]
    for i, s in enumerate(socks):
        if i % 3 == 0:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # headers half sent
        elif i % 3 == 1:  # whole headers, a tenth of the body
            head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            s.sendall(head.encode() + b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt"')
        # else: connected, nothing sent
    for _ in range(3):  # trickling a byte now and then does not move the deadline
        time.sleep(0.4)
        for s in socks[::3]:
            s.sendall(b"a")
    r = httpx.post(server + "/v1/completions", json=GOOD, headers=AUTH, timeout=10)  # served meanwhile
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == good_text(model, tiny_tokenizer)
    for s in socks:
        reply = recv_all(s)  # returns when the server closes the connection
        closed = time.monotonic() - start
        assert timeout - 0.1 < closed < timeout + 2.0, closed
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout"
        s.close()


def test_the_read_timeout_does_not_cut_a_long_answer(model, tiny_tokenizer):
    app = make_app(model, tiny_tokenizer)
    engine = app.state.server.engine
    engine.delay = 0.02  # 40 tokens: 0.8 s, longer than the read timeout
    with serve_in_thread(app, connections=ConnectionLimits(read_timeout=0.3)) as url:
        conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=30)
        for stream in (False, True, False):
            status, _, data = post(conn, "/v1/completions", {**GOOD, "max_tokens": 40, "stream": stream})
            assert status == 200 and (data.endswith(b"data: [DONE]\n\n") if stream else json.loads(data)["choices"])


def test_idle_keep_alive_connections_are_closed(model, tiny_tokenizer):
    limits = ConnectionLimits(keep_alive_timeout=0.5)
    with serve_in_thread(make_app(model, tiny_tokenizer), connections=limits) as url:
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            start = time.monotonic()
            reply = recv_all(s)
            assert reply.startswith(b"HTTP/1.1 200") and 0.4 < time.monotonic() - start < 3


def test_connections_over_the_cap_get_a_503_and_later_ones_are_served(model, tiny_tokenizer):
    cap = 4
    with serve_in_thread(make_app(model, tiny_tokenizer), connections=ConnectionLimits(max_connections=cap)) as url:
        holders = [http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=30) for _ in range(cap)]
        for conn in holders:  # each keeps its keep-alive connection open
            assert request(conn, "GET", "/health")[0] == 200
        for _ in range(3):
            extra = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=30)
            status, headers, data = post(extra, "/v1/completions", GOOD)
            assert status == 503 and openai_error(status, headers, data)["code"] == "too_many_connections"
            assert headers["connection"] == "close"
            extra.close()
        for conn in holders[1:]:  # still served
            assert post(conn, "/v1/completions", GOOD)[0] == 200
        holders[0].close()
        deadline = time.monotonic() + 5
        while True:  # the server notices the close within a moment
            extra = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=30)
            status = post(extra, "/v1/completions", GOOD)[0]
            extra.close()
            if status == 200:
                break
            assert status == 503 and time.monotonic() < deadline
            time.sleep(0.05)
        for conn in holders[1:]:
            conn.close()


# ---- the serve command's new flags -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--read-timeout", "0"], "--read-timeout: must be a positive number, got 0"),
        (["--read-timeout", "nan"], "--read-timeout: must be a positive number"),
        (["--keep-alive-timeout", "-1"], "--keep-alive-timeout: must be a positive number"),
        (["--keep-alive-timeout", "soon"], "--keep-alive-timeout: expected a number, got 'soon'"),
        (["--max-connections", "0"], "--max-connections: must be at least 1, got 0"),
        (["--allowed-host", "http://example.com"], "--allowed-host: expected a host name"),
        (["--allowed-host", "example.com:80"], "--allowed-host: expected a host name"),
        (["--cors-origin", "https://app.example/"], "--cors-origin: expected an origin"),
        (["--cors-origin", "app.example"], "--cors-origin: expected an origin"),
        (["--log-level", "loud"], "--log-level: invalid choice: 'loud'"),
    ],
)
def test_bad_serve_flags_print_one_line(monkeypatch, capsys, argv, expected):
    monkeypatch.setattr("gptlab.serve.app.serve", lambda *a, **k: pytest.fail("got past validation"))
    with pytest.raises(SystemExit) as e:
        main(["serve", "ckpt", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err
    assert expected in err.splitlines()[-1], err


def test_serve_flags_reach_the_server(monkeypatch):
    got = {}
    monkeypatch.setattr("gptlab.serve.app.serve", lambda checkpoint, **kw: got.update(kw))
    argv = ["serve", "ckpt", "--read-timeout", "7.5", "--keep-alive-timeout", "2", "--max-connections", "9"]
    argv += ["--allowed-host", "api.internal", "--allowed-host", "*", "--cors-origin", "http://localhost:3000"]
    assert main(argv) == 0
    assert got["connections"] == ConnectionLimits(keep_alive_timeout=2.0, read_timeout=7.5, max_connections=9)
    assert got["allowed_hosts"] == ["api.internal", "*"] and got["cors_origins"] == ["http://localhost:3000"]
    main(["serve", "ckpt"])
    assert got["connections"] == ConnectionLimits() and got["allowed_hosts"] == got["cors_origins"] == []


# ---- fuzz ----------------------------------------------------------------------------------------------
COMPLETION_FIELDS = [
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options", "seed",
    "presence_penalty", "frequency_penalty", "user", "logit_bias", "top_k", "min_p", "repetition_penalty",
    "logprobs", "echo", "best_of", "suffix", "response_format",
]  # fmt: skip
CHAT_FIELDS = [
    *[f for f in COMPLETION_FIELDS if f not in ("prompt", "echo", "best_of", "suffix")],
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
]  # fmt: skip
BIG_LITERALS = ["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "9" * 5000, "1e-400", "-0", "1.0e+308"]


def hostile_value(rng: random.Random, depth: int = 0):
    pick = rng.randrange(32 if depth < 3 else 26)
    simple = [
        float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 5e-324, -0.0, 0, 1, -1, 2**31, 2**63,
        -(2**63) - 1, 10**30, True, False, None, "", "x" * rng.choice([1, 300, 3000]), "\ud800", "a\udfffb",
        "\x00\x01\x1b", "😀<|im_end|>\u202e", "<|endoftext|>", "NaN", "tiny",
    ]  # fmt: skip
    if pick < len(simple):
        return simple[pick]
    if pick < 28:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if pick < 30:
        return {rng.choice(["type", "text", "x", "\ud800", ""]): hostile_value(rng, depth + 1)}
    nested: object = 0
    for _ in range(rng.choice([10, 40, 200])):
        nested = [nested]
    return nested


def hostile_message(rng: random.Random):
    if rng.random() < 0.2:
        return hostile_value(rng)
    role = rng.choice(["user", "system", "assistant", "developer", "tool", "wizard", "", 3])
    content = rng.choice(["hi", hostile_value(rng), [{"type": "text", "text": hostile_value(rng)}]])
    message = {"role": role, "content": content}
    if rng.random() < 0.3:
        message["name"] = rng.choice(["bob", "a b", "<|im_end|>", "x" * 65, hostile_value(rng)])
    if rng.random() < 0.1:
        message[rng.choice(["tool_calls", "extra", "name"])] = hostile_value(rng)
    return message


def hostile_body(rng: random.Random, chat: bool) -> bytes:
    kind = rng.random()
    if chat:
        body: dict = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    else:
        body = {"model": NAME, "prompt": "hello", "max_tokens": 3, "temperature": 0}
    if kind < 0.6:  # a request with a few fields set to hostile values
        fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
        for _ in range(rng.randrange(1, 4)):
            r = rng.random()
            if r < 0.7:
                body[rng.choice(fields)] = hostile_value(rng)
            elif r < 0.8:
                body.pop(rng.choice(list(body) or ["model"]), None)
            elif r < 0.9 and chat:
                body["messages"] = [hostile_message(rng) for _ in range(rng.randrange(4))]
            else:
                body[rng.choice(["bogus", "Model", "max_tokens ", "\u00e9"])] = hostile_value(rng)
        text = json.dumps(body)  # NaN, Infinity and lone surrogates (as \ud800 escapes) included
        if rng.random() < 0.2:  # a literal json.dumps cannot write
            text = text.replace('"max_tokens": 3', f'"max_tokens": {rng.choice(BIG_LITERALS)}', 1)
            text = text.replace('"temperature": 0', f'"temperature": {rng.choice(BIG_LITERALS)}', 1)
        return text.encode()
    raw = json.dumps(body).encode()
    if kind < 0.7:
        return raw[: rng.randrange(len(raw))]  # truncated
    if kind < 0.76:
        i = rng.randrange(len(raw))
        return rng.choice([raw[:i] + b"\xff\xc0" + raw[i:], b"\xef\xbb\xbf" + raw, json.dumps(body).encode("utf-16")])
    if kind < 0.82:
        return json.dumps(hostile_value(rng)).encode()  # not an object
    if kind < 0.86:
        depth = rng.choice([50, 3000])
        return b'{"prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
    if kind < 0.9:
        return json.dumps({**body, "prompt": "y" * (MAX_BODY + rng.randrange(1, 5000))}).encode()  # too big
    if kind < 0.94:
        return rng.choice([b"", b" ", b"null", b"{}", b"[]", b'"x"'])
    return raw.replace(b"{", b'{"model": 5, ', 1)  # duplicate key


OTHER_CONTENT_TYPES = [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/json; charset=utf-8",
    "APPLICATION/JSON", "application/json5", "*/*", "\xe9/\xe9",
]  # fmt: skip
OTHER_REQUESTS = [
    ("GET", "/"), ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/tiny"),
    ("GET", "/v1/models/%ED%A0%80"), ("GET", "/v1/models/" + "z" * 3000), ("DELETE", "/v1/completions"),
    ("PUT", "/v1/chat/completions"), ("PATCH", "/"), ("OPTIONS", "/v1/completions"), ("HEAD", "/health"),
    ("GET", "/nope"), ("POST", "/v1/models"), ("GET", "/v1/completions"), ("POST", "/%2e%2e/etc/passwd"),
    ("GET", "/%00%ff"), ("POST", "/health"), ("GET", "/health?x=%ff&y"), ("TRACE", "/"), ("BREW", "/coffee"),
]  # fmt: skip


def hostile_requests(seed: int, count: int) -> list[tuple[str, str, dict, bytes | None, bool]]:
    """(method, path, headers, body, chunked) of `count` requests drawn from `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        headers = {}
        auth = rng.random()
        if auth < 0.8:
            headers["Authorization"] = f"Bearer {KEY}"
        elif auth < 0.9:
            headers["Authorization"] = rng.choice(["Bearer wrong", "Bearer", "Basic abc", "bearer  " + KEY, "\xe9"])
        if rng.random() < 0.03:
            headers["Host"] = rng.choice(["evil.example", "localhost:1", "[::1]", "x" * 200])
        if rng.random() < 0.85:
            chat = rng.random() < 0.5
            path = "/v1/chat/completions" if chat else "/v1/completions"
            body = hostile_body(rng, chat)
            ctype = rng.random()
            if ctype < 0.85:
                headers["Content-Type"] = "application/json"
            elif ctype < 0.97:
                headers["Content-Type"] = rng.choice(OTHER_CONTENT_TYPES)
            out.append(("POST", path, headers, body, rng.random() < 0.1))
        else:
            method, path = rng.choice(OTHER_REQUESTS)
            out.append((method, path, headers, rng.choice([None, b"", b"{}"]), False))
    return out


VALID = [
    ("/v1/completions", {"model": NAME, "prompt": p, "max_tokens": 8, "temperature": 0})
    for p in ("The quick brown fox", "def add(a, b):", "Unicode: naïve café")
] + [("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                               "temperature": 0})]  # fmt: skip


def answer_text(path: str, data: bytes) -> str:
    choice = json.loads(data)["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_fuzz_hostile_requests_never_5xx_drop_the_connection_or_change_valid_answers(server):
    count, threads = 4000, 4
    port = port_of(server)
    alone = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for path, body in VALID:
        status, _, data = post(conn, path, body)
        assert status == 200
        alone[path, json.dumps(body)] = answer_text(path, data)
    conn.close()
    requests = hostile_requests(seed=1234, count=count)
    done = threading.Event()
    statuses: list[int] = []

    def hostile(part: list) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        sock = conn.sock
        for i, (method, path, headers, body, chunked) in enumerate(part):
            where = f"{method} {path} {headers} {body[:300] if body else body!r}"
            if chunked and body:
                body = [body[j : j + 700] for j in range(0, len(body), 700)]
            try:
                conn.request(method, path, body=body, headers=headers, encode_chunked=chunked and body is not None)
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException) as e:
                raise AssertionError(f"request {i} dropped the connection ({e!r}): {where}") from None
            assert r.status < 500, f"{r.status} {data[:500]!r}: {where}"
            assert r.headers["x-request-id"], where
            if r.status >= 400 and method != "HEAD":
                try:
                    openai_error(r.status, r.headers, data)
                except (AssertionError, ValueError) as e:
                    raise AssertionError(f"not an OpenAI error ({e}): {r.status} {data[:300]!r}: {where}") from None
            assert conn.sock is sock, f"the server closed the connection after {r.status}: {where}"
            statuses.append(r.status)
        conn.close()

    def valid() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        checked = 0
        while not done.is_set() or checked < len(VALID):
            path, body = VALID[checked % len(VALID)]
            status, _, data = post(conn, path, body)
            assert status == 200, data
            assert answer_text(path, data) == alone[path, json.dumps(body)], (path, body)
            checked += 1
        conn.close()
        return checked

    with ThreadPoolExecutor(threads + 1) as pool:
        checker = pool.submit(valid)
        parts = [pool.submit(hostile, requests[i::threads]) for i in range(threads)]
        try:
            for part in parts:
                part.result()
        finally:
            done.set()
        checked = checker.result()
    assert len(statuses) == count and checked >= len(VALID)
    codes = {s: statuses.count(s) for s in sorted(set(statuses))}
    assert {200, 400, 401, 404, 405, 413, 415} <= set(codes), codes  # the fuzz reached every kind of answer


# ---- one request never fails the others ------------------------------------------------------------------
POISON = [
    ({"temperature": 1e-300}, 200),
    ({"temperature": 5e-324}, 200),
    ({"temperature": 1e-40, "top_p": 1e-300}, 200),
    ({"temperature": 1e-300, "seed": 3, "n": 2}, 200),
    ({"repetition_penalty": 1e-300, "temperature": 1}, 400),
    ({"repetition_penalty": 1e300, "temperature": 1}, 400),
    ({"temperature": 1e-300, "presence_penalty": 2, "frequency_penalty": -2, "top_k": 1}, 200),
]


def test_poisoned_requests_beside_innocent_ones_change_nothing(server, model, tiny_tokenizer):
    """Numerically hostile sampling values sent together with ordinary greedy requests, in the same
    batches: every innocent request gets its text alone, every poisoned one a completion (tiny
    temperatures are greedy) or a 400 naming the parameter, never a 500 or a broken stream."""
    prompts = ["The quick brown fox", "def add(a, b):", "Numbers: 3.14", "x"]
    want = {p: reference(model, tiny_tokenizer, p, 6)[0].text for p in prompts}

    def innocent(prompt: str):
        conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=60)
        status, _, data = post(conn, "/v1/completions", {**GOOD, "prompt": prompt})
        conn.close()
        return prompt, status, data

    def poisoned(i: int):
        extra, expected = POISON[i % len(POISON)]
        conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=60)
        status, headers, data = post(conn, "/v1/completions", {**GOOD, "max_tokens": 8, **extra})
        conn.close()
        return extra, expected, status, headers, data

    with ThreadPoolExecutor(12) as pool:
        innocents = [pool.submit(innocent, prompts[i % len(prompts)]) for i in range(16)]
        poisons = [pool.submit(poisoned, i) for i in range(2 * len(POISON))]
        for future in poisons:
            extra, expected, status, headers, data = future.result()
            assert status == expected, (extra, status, data)
            if status == 400:
                assert openai_error(status, headers, data)["param"] == "repetition_penalty"
            else:
                choices = json.loads(data)["choices"]
                assert all(c["finish_reason"] == "length" and c["text"] for c in choices), (extra, data)
        for future in innocents:
            prompt, status, data = future.result()
            assert status == 200 and json.loads(data)["choices"][0]["text"] == want[prompt]
