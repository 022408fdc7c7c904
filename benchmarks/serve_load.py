"""Load test of `gptlab serve`: continuous batching vs the same server one sequence at a time.

Builds a random-weight model of a small preset (nano by default) with a BPE trained on some of the
standard library, starts `python -m gptlab serve` on 127.0.0.1 for each `--max-concurrent` setting,
and runs `--clients` concurrent clients x `--requests` sequential requests each (POST
/v1/completions, non-streaming). Reports requests/s, generated tokens/s, p50/p99 latency and
errors as a Markdown table. Only 127.0.0.1 is contacted; every loop is bounded.

    python benchmarks/serve_load.py [--preset nano] [--clients 32] [--requests 8] [--max-tokens 48]
                                    [--settings 32,1] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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


def build_checkpoint(preset_name: str, out: Path) -> Path:
    """A random-weight `preset_name` model with a BPE trained on standard-library sources."""
    import torch

    from gptlab.checkpoint import save_model
    from gptlab.model import GPT
    from gptlab.presets import preset
    from gptlab.tokenizer import Tokenizer

    vocab = preset(preset_name).vocab_size
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:120]
    tokenizer = Tokenizer.train(files, vocab_size=vocab, show_progress=False)
    torch.manual_seed(0)
    model = GPT(preset(preset_name, vocab_size=tokenizer.vocab_size))
    return save_model(model, out, tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    checkpoint: Path, port: int, max_concurrent: int, queue: int, threads: int | None
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "gptlab",
        "serve",
        str(checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-concurrent",
        str(max_concurrent),
        "--max-queue",
        str(queue),
        "--model-name",
        "bench",
        "--log-level",
        "warning",
    ] + ([] if threads is None else ["--threads", str(threads)])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not come up within 120 s")


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
    lat = sorted(latencies) or [float("nan")]
    return {
        "requests": clients * requests,
        "errors": errors,
        "wall s": round(wall, 2),
        "requests/s": round(len(latencies) / wall, 2),
        "tokens/s": round(tokens / wall, 1),
        "p50 latency s": round(statistics.median(lat), 3),
        "p99 latency s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano", help="model preset with random weights (default nano)")
    ap.add_argument("--checkpoint", help="serve this checkpoint instead of a random preset")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=8, help="sequential requests per client")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--settings", default="32,1", help="--max-concurrent values to compare (default 32,1)")
    ap.add_argument("--threads", type=int, help="the server's torch threads (default: torch's choice)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = (
            Path(args.checkpoint) if args.checkpoint else build_checkpoint(args.preset, Path(tmp) / "ckpt")
        )
        rows = []
        for setting in (int(s) for s in args.settings.split(",")):
            port = free_port()
            proc = start_server(checkpoint, port, setting, queue=args.clients * 2, threads=args.threads)
            try:
                row = asyncio.run(
                    load(
                        f"http://127.0.0.1:{port}",
                        args.clients,
                        args.requests,
                        args.max_tokens,
                        args.temperature,
                    )
                )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            rows.append({"max concurrent": setting, **row})
            print(f"max-concurrent {setting}: {row}", file=sys.stderr, flush=True)
    from gptlab.reports.table import format_table

    model = args.checkpoint or f"{args.preset} (random weights)"
    print(
        f"\n{model}, {args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}, "
        f"temperature {args.temperature}, {os.cpu_count()} CPUs, server threads {args.threads or 'default'}\n"
    )
    print(format_table(rows, markdown=True))
    base = min(rows, key=lambda r: r["max concurrent"])
    for r in rows:
        if r is not base and base["tokens/s"]:
            print(
                f"\nmax-concurrent {r['max concurrent']}: {r['tokens/s'] / base['tokens/s']:.1f}x "
                f"the tokens/s of max-concurrent {base['max concurrent']}"
            )


if __name__ == "__main__":
    main()
