"""Load tests of `gptlab serve` on 127.0.0.1: continuous batching, prefix caching, llama.cpp as a peer.

Workloads (`--workload`, one or more; random weights, speed does not depend on their values):

  load           the original test: `--clients` concurrent clients x `--requests` sequential requests
                 (POST /v1/completions, non-streaming), once per `--max-concurrent` setting in
                 `--settings` (default 32,1: continuous batching vs one sequence at a time).
  shared-prefix  `--clients` clients, each request a common `--prefix-tokens` system prompt (512) plus a
                 `--question-tokens` question of its own (32), `--max-tokens` new tokens (64), streamed;
                 prefix caching on vs off (`gptlab serve --no-prefix-caching`). Time to first token, requests/s
                 and tokens/s, and the KV bytes held at peak (GET /health's `kv_cache`) against what the
                 old design held: one n_ctx slot per concurrent sequence, float32.
  llamacpp       llama.cpp's server (`python -m llama_cpp.server`, llama-cpp-python) on the same weights
                 exported by `gptlab export --format gguf`, at 1 and `--clients` concurrent clients: gptlab
                 float32 vs GGUF f32, gptlab `--quantize int8` vs GGUF q8_0. Both get the same prompt strings
                 (`--prompt-tokens` words of one token each), greedy decoding and the same max_tokens.

shared-prefix and llamacpp default to GPT-2 124M's shape (preset gpt2) with GPT-2's BPE from
shared/fixtures/gpt2-bpe where it exists (else a BPE trained on standard-library sources, as `load`
uses). Each round uses fresh prompts; `--repeats` rounds, medians reported. Every client sends a bounded
number of requests and stops sending after `--time-limit` seconds; only 127.0.0.1 is contacted.

    python benchmarks/serve_load.py                                     # load, nano, settings 32,1
    python benchmarks/serve_load.py --workload shared-prefix llamacpp   # GPT-2 124M, full sizes
    python benchmarks/serve_load.py --workload shared-prefix llamacpp --preset nano --clients 4 \\
        --requests 1 --repeats 1 --prefix-tokens 96 --question-tokens 16 --max-tokens 16   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import httpx
from serve_clients import (
    LLAMACPP_SETTINGS,
    ROOT,
    ServerFailed,
    export_gguf,
    free_port,
    health,
    load,
    medians,
    mib,
    rounded,
    start_llamacpp,
    start_server,
    stop,
    stream_load,
)

sys.path.insert(0, str(ROOT))
from gptlab.reports.run_report import cpu_name  # noqa: E402

GPT2_BPE = ROOT.parent / "shared/fixtures/gpt2-bpe"
WORKLOADS = ("load", "shared-prefix", "llamacpp")
DEFAULTS = {  # workload: (preset, requests per client, max_tokens)
    "load": ("nano", 8, 48),
    "shared-prefix": ("gpt2", 4, 64),
    "llamacpp": ("gpt2", 1, 64),
}


# ---- models and prompts ------------------------------------------------------------------------
def build_checkpoint(preset_name: str, out: Path, bpe: Path | None = None) -> Path:
    """A random-weight `preset_name` model with GPT-2's BPE from `bpe` (when given), else a BPE
    trained on standard-library sources."""
    import torch

    from gptlab.checkpoint import save_model
    from gptlab.model import GPT
    from gptlab.presets import preset
    from gptlab.tokenizer import Tokenizer

    if bpe is not None:
        tokenizer = Tokenizer.gpt2(bpe)
    else:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(stdlib.glob("*.py"))[:120]
        tokenizer = Tokenizer.train(files, vocab_size=preset(preset_name).vocab_size, show_progress=False)
    torch.manual_seed(0)
    model = GPT(preset(preset_name, vocab_size=tokenizer.vocab_size))
    return save_model(model, out, tokenizer)


class Words:
    """Prompts of an exact length in tokens: words that are one token each with their leading space
    (" the"), so a run of n of them encodes to exactly those n ids in gptlab and in llama.cpp (both
    pre-split GPT-2 style, one word a piece)."""

    def __init__(self, checkpoint: Path) -> None:
        from gptlab.checkpoint import load_tokenizer

        self.tokenizer = load_tokenizer(checkpoint)
        word = re.compile(r" [a-z]{2,10}")
        self.ids = [
            i
            for i in range(self.tokenizer.vocab_size)
            if word.fullmatch(text := self.tokenizer.decode([i])) and self.tokenizer.encode(text) == [i]
        ]
        if len(self.ids) < 64:
            raise ValueError(f"the tokenizer has only {len(self.ids)} one-token words; prompts need 64 or more")

    def draw(self, rng: random.Random, n: int) -> list[int]:
        return [rng.choice(self.ids) for _ in range(n)]

    def text(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        got = self.tokenizer.encode(text)
        if got != ids:
            raise ValueError(f"a {len(ids)}-word prompt encodes to {len(got)} tokens, not {len(ids)}")
        return text


def model_config(checkpoint: Path):
    from gptlab.checkpoint import load_model

    return load_model(checkpoint).config


# ---- workloads ---------------------------------------------------------------------------------
def run_load(
    args: argparse.Namespace, checkpoint: Path, requests: int, max_tokens: int, work: Path
) -> str:
    """Continuous batching vs smaller --max-concurrent settings (non-streaming)."""
    from gptlab.reports.table import format_table

    rows = []
    for setting in (int(s) for s in args.settings.split(",")):
        port = free_port()
        proc = start_server(checkpoint, port, setting, queue=args.clients * 2, threads=args.threads)
        try:
            url = f"http://127.0.0.1:{port}"
            row = asyncio.run(load(url, args.clients, requests, max_tokens, args.temperature))
        finally:
            stop(proc)
        rows.append({"max concurrent": setting, **row})
        print(f"max-concurrent {setting}: {row}", file=sys.stderr, flush=True)
    lines = [
        f"{checkpoint_label(args, 'load')}, {args.clients} clients x {requests} requests, max_tokens "
        f"{max_tokens}, temperature {args.temperature}, server threads {args.threads or 'default'}\n",
        format_table(rows, markdown=True),
    ]
    base = min(rows, key=lambda r: r["max concurrent"])
    for r in rows:
        if r is not base and base["tokens/s"]:
            lines.append(
                f"\nmax-concurrent {r['max concurrent']}: {r['tokens/s'] / base['tokens/s']:.1f}x "
                f"the tokens/s of max-concurrent {base['max concurrent']}"
            )
    return "\n".join(lines)


def run_shared_prefix(
    args: argparse.Namespace, checkpoint: Path, requests: int, max_tokens: int, work: Path
) -> str:
    """A common system prompt per round, prefix caching on and off; TTFT, throughput, peak KV bytes."""
    from gptlab.reports.table import format_table

    config, words = model_config(checkpoint), Words(checkpoint)
    if args.prefix_tokens + args.question_tokens + max_tokens > config.n_ctx:
        raise SystemExit(
            f"shared-prefix: {args.prefix_tokens} + {args.question_tokens} + {max_tokens} tokens exceed the "
            f"context of {config.n_ctx}; lower --prefix-tokens / --question-tokens / --max-tokens"
        )

    def bodies(round_: int) -> list[list[dict]]:
        rng = random.Random(1000 + round_)
        prefix = words.draw(rng, args.prefix_tokens)
        body = {"model": "bench", "max_tokens": max_tokens, "temperature": args.temperature, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        return [
            [{**body, "prompt": prefix + words.draw(rng, args.question_tokens), "seed": rng.randrange(1 << 30)}
             for _ in range(requests)]
            for _ in range(args.clients)
        ]  # fmt: skip

    warm = {"model": "bench", "prompt": words.draw(random.Random(1), 8), "max_tokens": 4, "stream": True}
    pool = [] if args.kv_cache_tokens is None else ["--kv-cache-tokens", str(args.kv_cache_tokens)]
    slot_bytes = args.clients * config.n_ctx * config.kv_bytes_per_token(4)
    rows, notes = [], []
    for caching, flags in (("on", []), ("off", ["--no-prefix-caching"])):
        row: dict = {"prefix caching": caching}
        try:
            proc = start_server(checkpoint, port := free_port(), args.clients, 2 * args.clients, args.threads,
                                flags + pool)  # fmt: skip
        except ServerFailed as e:
            notes.append(f"prefix caching {caching}: not measured: {e}")
            print(notes[-1], file=sys.stderr, flush=True)
            rows.append({**row, "requests": "n/a"})
            continue
        url = f"http://127.0.0.1:{port}"
        try:
            rounds = []
            for r in range(args.repeats):
                rounds.append(asyncio.run(stream_load(url, bodies(r), warm, args.time_limit)))
                print(f"prefix caching {caching}, round {r}: {rounded(rounds[-1])}", file=sys.stderr, flush=True)
            kv = health(url).get("kv_cache")
        finally:
            stop(proc)
        row.update(rounded(medians(rounds)))
        enabled = (kv or {}).get("prefix_cache", {}).get("enabled")
        if enabled is not None and enabled != (caching == "on"):
            notes.append(f"prefix caching {caching}: GET /health says prefix_cache.enabled is {enabled}")
        if kv:
            hit_rate = f"{100 * kv['prefix_cache']['hit_rate']:.1f}%"
            row.update({"KV blocks peak / total": f"{kv['blocks_peak']} / {kv['blocks_total']}",
                        "peak KV MiB": mib(kv["blocks_peak"] * kv["bytes_per_block"]),
                        "prefix hit rate (tokens)": hit_rate})  # fmt: skip
        else:
            row.update({"KV blocks peak / total": "n/a", "peak KV MiB": "n/a", "prefix hit rate (tokens)": "n/a"})
            notes.append(f"prefix caching {caching}: GET /health has no kv_cache object")
        row["slot design KV MiB"] = mib(slot_bytes)
        rows.append(row)
    return "\n".join([
        f"Shared prefix: {checkpoint_label(args, 'shared-prefix')}; {args.clients} clients x {requests} "
        f"streamed requests, each a common {args.prefix_tokens}-token system prompt + its own "
        f"{args.question_tokens}-token question (token ids), {max_tokens} new tokens, temperature "
        f"{args.temperature}; max-concurrent {args.clients}, server threads {args.threads or 'default'}, "
        f"KV pool {args.kv_cache_tokens or 'the server default'} tokens; medians of {args.repeats} rounds, a "
        f"new system prompt each. Peak KV = blocks_peak x bytes_per_block from GET /health; the slot design "
        f"held max_concurrent x n_ctx x 2 x n_layer x n_embd x 4 bytes = {args.clients} x {config.n_ctx} x "
        f"{config.kv_bytes_per_token(4):,} bytes (float32).\n",
        format_table(filled(rows), markdown=True),
        *(f"\n{n}" for n in notes),
    ])  # fmt: skip


def run_llamacpp(
    args: argparse.Namespace, checkpoint: Path, requests: int, max_tokens: int, work: Path
) -> str:
    """gptlab vs llama-cpp-python's server on the same weights, at equal precision, 1 and --clients clients."""
    from gptlab.reports.table import format_table

    config, words = model_config(checkpoint), Words(checkpoint)
    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        llama_missing = f"llama-cpp-python is not installed ({e}): pip install 'llama-cpp-python[server]'"
        print(llama_missing, file=sys.stderr)
    else:
        llama_missing = None
    levels = sorted({1, args.clients})

    def texts(round_: int, clients: int) -> list[list[str]]:
        rng = random.Random(2000 + 100 * round_ + clients)
        n = args.solo_requests if clients == 1 else requests
        return [[words.text(words.draw(rng, args.prompt_tokens)) for _ in range(n)] for _ in range(clients)]

    def body(kind: str, prompt: str, max_tokens: int) -> dict:
        out = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        if kind == "gptlab":  # no ignore_eos in gptlab: random weights rarely choose <|endoftext|>
            return {**out, "stream_options": {"include_usage": True}}
        return {**out, "min_tokens": max_tokens, "repeat_penalty": 1.0}  # min_tokens: EOS masked until max

    engines = [
        ("gptlab", "fp32", ["--threads", str(threads)]),
        ("llama.cpp", "f32", None),
        ("gptlab", "int8", ["--threads", str(threads), "--quantize", "int8"]),
        ("llama.cpp", "q8_0", None),
    ]
    rows, notes = [], []
    for kind, weights, flags in engines:
        base = {"engine": kind, "weights": weights}
        try:
            if kind == "gptlab":
                proc = start_server(checkpoint, port := free_port(), args.clients, 2 * args.clients, None, flags)
            elif llama_missing:
                raise ServerFailed(llama_missing)
            else:
                gguf = export_gguf(checkpoint, work / f"model-{weights}.gguf", weights)
                proc = start_llamacpp(gguf, port := free_port(), config.n_ctx, threads)
        except (ServerFailed, subprocess.CalledProcessError) as e:
            notes.append(f"{kind} {weights}: not measured: {e}")
            print(notes[-1], file=sys.stderr, flush=True)
            rows += [{**base, "clients": c, "requests": "n/a"} for c in levels]
            continue
        url = f"http://127.0.0.1:{port}"
        try:
            probe = {**body(kind, texts(99, 1)[0][0], 2), "stream": False}
            probe.pop("stream_options", None)
            answer = httpx.post(url + "/v1/completions", json=probe, timeout=600).json()
            prompt_tokens = answer["usage"]["prompt_tokens"]
            warm = body(kind, texts(98, 1)[0][0], 4)
            rounds: dict[int, list[dict]] = {c: [] for c in levels}
            for r in range(args.repeats):
                for c in levels:
                    bodies = [[body(kind, t, max_tokens) for t in client] for client in texts(r, c)]
                    rounds[c].append(asyncio.run(stream_load(url, bodies, warm, args.time_limit)))
                    print(f"{kind} {weights}, {c} clients, round {r}: {rounded(rounds[c][-1])}", file=sys.stderr,
                          flush=True)  # fmt: skip
            kv = health(url).get("kv_cache") if kind == "gptlab" else None
        finally:
            stop(proc)
        if kind == "gptlab":
            held = f"{mib(kv['blocks_peak'] * kv['bytes_per_block'])} (peak)" if kv else "n/a"
        else:  # llama.cpp allocates n_ctx tokens of float16 keys and values at load
            held = f"{mib(config.n_ctx * config.kv_bytes_per_token(2))} (allocated)"
        for c in levels:
            rows.append({**base, "clients": c, **rounded(medians(rounds[c])), "prompt tokens": prompt_tokens,
                         "KV MiB": held})  # fmt: skip
    lines = [
        f"llama.cpp comparison: {checkpoint_label(args, 'llamacpp')}; prompts of {args.prompt_tokens} one-token "
        f"words (the same strings to both servers, new ones each round), {max_tokens} new tokens, greedy; "
        f"{args.solo_requests} requests at 1 client, {args.clients} clients x {requests} requests; medians of "
        f"{args.repeats} rounds; {threads} threads for both. gptlab: continuous batching, max-concurrent "
        f"{args.clients}, stream_options.include_usage for the token counts. {LLAMACPP_SETTINGS}. "
        "'prompt tokens' is each server's own count of the first prompt.\n",
        format_table(filled(rows), markdown=True),
    ]
    measured = {(r["engine"], r["weights"], r["clients"]): r["tokens/s"] for r in rows if "tokens/s" in r}
    for ours, theirs in (("fp32", "f32"), ("int8", "q8_0")):
        for c in levels:
            a, b = measured.get(("gptlab", ours, c)), measured.get(("llama.cpp", theirs, c))
            if a and b:
                lines.append(f"\n{c} client(s): gptlab {ours} {a / b:.2f}x the tokens/s of llama.cpp {theirs}")
    return "\n".join(lines + [f"\n{n}" for n in notes])


def filled(rows: list[dict]) -> list[dict]:
    """Rows of a configuration that was not measured get "n/a" in every column the others have."""
    columns = max((list(r) for r in rows), key=len)
    return [{c: r.get(c, "n/a") for c in columns} for r in rows]


def checkpoint_label(args: argparse.Namespace, workload: str) -> str:
    return args.checkpoint or f"{args.preset or DEFAULTS[workload][0]} (random weights)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", nargs="+", default=["load"], choices=WORKLOADS, help="default: load")
    ap.add_argument("--preset", help="preset with random weights (default: nano for load, gpt2 for the others)")
    ap.add_argument("--checkpoint", help="serve this checkpoint instead of a random preset")
    ap.add_argument("--bpe", default=str(GPT2_BPE), help="GPT-2's encoder.json + vocab.bpe, for 50257-id presets")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    ap.add_argument("--requests", type=int, help="sequential requests per client (default: load 8, "
                    "shared-prefix 4, llamacpp 1)")  # fmt: skip
    ap.add_argument("--max-tokens", type=int, help="new tokens a request (default: load 48, others 64)")
    ap.add_argument("--temperature", type=float, default=1.0, help="load and shared-prefix (llamacpp: greedy)")
    ap.add_argument("--settings", default="32,1", help="load: --max-concurrent values to compare (default 32,1)")
    ap.add_argument("--threads", type=int, help="the servers' threads (default: gptlab's, all cores but one)")
    ap.add_argument("--prefix-tokens", type=int, default=512, help="shared-prefix: system prompt tokens")
    ap.add_argument("--question-tokens", type=int, default=32, help="shared-prefix: question tokens")
    ap.add_argument("--kv-cache-tokens", type=int, help="shared-prefix: the server's KV pool (default: its own)")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="llamacpp: prompt tokens (default 32)")
    ap.add_argument("--solo-requests", type=int, default=8, help="llamacpp: requests at 1 client (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of shared-prefix and llamacpp (median)")
    ap.add_argument("--time-limit", type=float, default=900, help="seconds after which a round sends no more")
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores", file=sys.stderr, flush=True)
    runners = {"load": run_load, "shared-prefix": run_shared_prefix, "llamacpp": run_llamacpp}
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        built: dict[str, Path] = {}
        for workload in args.workload:
            name, requests, max_tokens = DEFAULTS[workload]
            name = args.preset or name
            if args.checkpoint:
                checkpoint = Path(args.checkpoint)
            elif name not in built:
                from gptlab.presets import preset

                bpe = Path(args.bpe) if preset(name).vocab_size == 50257 and (Path(args.bpe) / "encoder.json").is_file() else None  # noqa: E501
                print(f"building {name} with {'GPT-2 BPE' if bpe else 'a trained BPE'}", file=sys.stderr, flush=True)
                checkpoint = built[name] = build_checkpoint(name, Path(tmp) / name / "ckpt", bpe)
            else:
                checkpoint = built[name]
            requests = args.requests or requests
            tables.append(runners[workload](args, checkpoint, requests, args.max_tokens or max_tokens, Path(tmp)))
    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} logical cores")
    for table in tables:
        print(f"\n{table}")


if __name__ == "__main__":
    main()
