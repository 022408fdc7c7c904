"""Servers to start and clients to load them, for benchmarks/serve_load.py.

`gptlab serve` and llama-cpp-python's server run as subprocesses on 127.0.0.1 (stderr kept, so a
refused flag is reported with the server's own words); the clients are httpx, non-streaming (`load`) or
streamed with time to first token (`stream_load`). Every client sends a bounded number of requests.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Config:\n    def __init__(self",
    "# Copyright",
    "for i in range(",
    "The quick brown fox",
    "return self._",
    "if __name__ == '__main__':",
]


# ---- servers -----------------------------------------------------------------------------------
class ServerFailed(RuntimeError):
    """A server exited before it answered (an unknown flag, a bad model) or never came up."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """This checkout's gptlab first on the path of the servers and `gptlab export`."""
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _launch(cmd: list[str], probe: str, what: str, timeout: float = 300) -> subprocess.Popen:
    """Start `cmd` and wait (at most `timeout` s) until GET `probe` answers 200; its stderr goes to a
    temp file whose tail is the error when it exits first."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
            log.close()
            raise ServerFailed(f"{what} exited with code {proc.returncode}: {' | '.join(tail)}")
        try:
            if httpx.get(probe, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise ServerFailed(f"{what} did not come up within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    proc.log.close()  # type: ignore[attr-defined]


def start_server(
    checkpoint: Path, port: int, max_concurrent: int, queue: int, threads: int | None, extra: Sequence[str] = ()
) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "gptlab", "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
        "--max-concurrent", str(max_concurrent), "--max-queue", str(queue), "--model-name", "bench",
        "--log-level", "warning", *([] if threads is None else ["--threads", str(threads)]), *extra,
    ]  # fmt: skip
    return _launch(cmd, f"http://127.0.0.1:{port}/health", f"gptlab serve {' '.join(extra)}".strip())


def start_llamacpp(gguf: Path, port: int, n_ctx: int, threads: int) -> subprocess.Popen:
    """llama-cpp-python's OpenAI server (see LLAMACPP_SETTINGS)."""
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
        "--port", str(port), "--model_alias", "bench", "--n_ctx", str(n_ctx), "--n_threads", str(threads),
        "--n_threads_batch", str(threads), *LLAMACPP_FLAGS,
    ]  # fmt: skip
    return _launch(cmd, f"http://127.0.0.1:{port}/v1/models", f"llama_cpp.server ({gguf.name})")


# llama-cpp-python's server decodes one sequence at a time: it has no parallel slots and no continuous
# batching (llama.cpp's C++ llama-server has --parallel; llama-cpp-python does not build or wrap it).
# interrupt_requests is on by default and would cut a running request short when the next one arrives;
# logits_all is on by default and would compute logits for every prompt token (gptlab: the last only).
LLAMACPP_FLAGS = ["--interrupt_requests", "False", "--logits_all", "False", "--verbose", "False"]
LLAMACPP_SETTINGS = (
    "llama-cpp-python server: one sequence at a time (no parallel slots or continuous batching in "
    "llama-cpp-python; later requests wait their turn), interrupt_requests False, logits_all False, "
    "n_batch 512 (default), n_ctx = the model's, n_threads = n_threads_batch = --threads; min_tokens = "
    "max_tokens so EOS cannot end a request early, repeat_penalty 1.0, temperature 0 (greedy)"
)


def health(url: str) -> dict:
    try:
        return httpx.get(url + "/health", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return {}


def export_gguf(checkpoint: Path, out: Path, dtype: str) -> Path:
    """The checkpoint as GGUF `dtype` through `gptlab export` (what a user runs)."""
    if not out.is_file():
        cmd = [sys.executable, "-m", "gptlab", "export", str(checkpoint), "--format", "gguf"]
        subprocess.run([*cmd, "--out", str(out), "--dtype", dtype], env=_env(), check=True, stdout=subprocess.DEVNULL)
    return out


# ---- clients -----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    values = sorted(values) or [float("nan")]
    return values[min(len(values) - 1, int(q * len(values)))]


async def load(url: str, clients: int, requests: int, max_tokens: int, temperature: float) -> dict:
    latencies: list[float] = []
    tokens = errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        rng = random.Random(c)
        for _ in range(requests):
            body = {
                "model": "bench",
                "prompt": rng.choice(PROMPTS),
                "max_tokens": max_tokens,
                "temperature": temperature,
                "seed": rng.randrange(1 << 30),
            }
            start = time.perf_counter()
            try:
                r = await http.post(url + "/v1/completions", json=body)
                if r.status_code != 200:
                    errors += 1
                    continue
                tokens += r.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - start)
            except httpx.HTTPError:
                errors += 1

    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await http.post(url + "/v1/completions", json={"model": "bench", "prompt": "warm", "max_tokens": 4})
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - start
    return {
        "requests": clients * requests,
        "errors": errors,
        "wall s": round(wall, 2),
        "requests/s": round(len(latencies) / wall, 2),
        "tokens/s": round(tokens / wall, 1),
        "p50 latency s": round(statistics.median(latencies or [math.nan]), 3),
        "p99 latency s": round(percentile(latencies, 0.99), 3),
    }


async def stream_one(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, int]:
    """One streamed completion: (seconds to the first chunk with a choice, seconds in all, tokens made).
    Tokens: the usage chunk's count where the server sends one, else max_tokens when it stopped for
    length, else the chunks seen (one a token in both servers)."""
    start = time.perf_counter()
    first, tokens, chunks, finish = None, None, 0, None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                first = first if first is not None else time.perf_counter() - start
                if choice.get("finish_reason") is None:
                    chunks += 1
                else:
                    finish = choice["finish_reason"]
    if first is None:
        raise RuntimeError("the stream ended without a choice")
    if tokens is None:
        tokens = body["max_tokens"] if finish == "length" else chunks
    return first, time.perf_counter() - start, tokens


async def stream_load(url: str, bodies: list[list[dict]], warm: dict, time_limit: float) -> dict:
    """Client c sends bodies[c] one after another, all clients at once; no request starts after
    `time_limit` seconds."""
    ttfts: list[float] = []
    latencies: list[float] = []
    tokens = errors = skipped = 0
    failures: list[str] = []
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))

    async def client(requests: list[dict], http: httpx.AsyncClient, deadline: float) -> None:
        nonlocal tokens, errors, skipped
        for body in requests:
            if time.perf_counter() > deadline:
                skipped += 1
                continue
            try:
                ttft, latency, made = await stream_one(http, url, body)
            except (httpx.HTTPError, RuntimeError, ValueError) as e:
                errors += 1
                failures.append(f"{type(e).__name__}: {e}")
                continue
            ttfts.append(ttft)
            latencies.append(latency)
            tokens += made

    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await stream_one(http, url, warm)
        start = time.perf_counter()
        await asyncio.gather(*(client(b, http, start + time_limit) for b in bodies))
        wall = time.perf_counter() - start
    if failures:
        print(f"  {len(failures)} failed requests, the first: {failures[0]}", file=sys.stderr)
    done = len(latencies)
    return {
        "requests": done,
        "errors": errors + skipped,
        "requests/s": done / wall,
        "tokens/s": tokens / wall,
        "TTFT p50 s": statistics.median(ttfts or [math.nan]),
        "TTFT p99 s": percentile(ttfts, 0.99),
        "tokens/request": tokens / done if done else math.nan,
    }


def medians(rounds: list[dict]) -> dict:
    """The median of each number over the rounds; counts (requests, errors) summed."""
    out = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        out[key] = sum(values) if key in ("requests", "errors") else statistics.median(values)
    return out


def rounded(row: dict) -> dict:
    digits = {"requests/s": 2, "tokens/s": 1, "TTFT p50 s": 3, "TTFT p99 s": 3, "tokens/request": 1}
    return {k: round(v, digits[k]) if k in digits and isinstance(v, float) and math.isfinite(v) else v
            for k, v in row.items()}  # fmt: skip


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f}"
