"""GET /metrics in Prometheus' text format, through `prometheus_client`: requests by endpoint and
status, prompt and generated tokens, queue depth, running sequences, KV-cache usage and prefix-cache
hit rate (read from the engine at each scrape), and histograms of time to first token, inter-token
latency and end-to-end latency (observed by the engine as tokens are sampled)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
ENDPOINTS = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/tokenize", "/detokenize",
    "/health", "/metrics", "/",
})  # fmt: skip
"""Paths that get their own `endpoint` label; any other is 'other' (no label per probed URL)."""

# (key in Engine.stats(), metric name, type, help); nested keys are joined with '.'
_STATS = [
    ("active", "gptlab_sequences_active", "gauge", "Sequences decoding now."),
    ("waiting", "gptlab_requests_waiting", "gauge", "Requests queued or preempted (the queue depth)."),
    ("slots", "gptlab_sequences_max", "gauge", "Sequences that may decode together (--max-concurrent)."),
    ("steps", "gptlab_decode_steps_total", "counter", "Batched decoding steps run."),
    ("max_batch", "gptlab_decode_batch_max", "gauge", "Largest batch decoded in one step."),
    ("completed", "gptlab_requests_completed_total", "counter", "Sequences finished."),
    ("cancelled", "gptlab_requests_cancelled_total", "counter", "Requests cancelled (client left)."),
    ("failed", "gptlab_requests_failed_total", "counter", "Sequences failed by an engine error."),
    ("tokens", "gptlab_generated_tokens_total", "counter", "Tokens generated."),
    ("kv_cache.block_size", "gptlab_kv_cache_block_tokens", "gauge", "Tokens per KV cache block."),
    ("kv_cache.blocks_total", "gptlab_kv_cache_blocks", "gauge", "KV cache blocks."),
    ("kv_cache.blocks_in_use", "gptlab_kv_cache_blocks_in_use", "gauge", "KV cache blocks held by sequences."),
    ("kv_cache.blocks_peak", "gptlab_kv_cache_blocks_peak", "gauge", "Most KV cache blocks ever in use."),
    ("kv_cache.blocks_cached", "gptlab_kv_cache_blocks_cached", "gauge", "Free blocks kept for prefix hits."),
    ("kv_cache.bytes_per_block", "gptlab_kv_cache_block_bytes", "gauge", "Bytes of one KV cache block."),
    ("kv_cache.preemptions", "gptlab_preemptions_total", "counter", "Sequences preempted for KV blocks."),
    ("kv_cache.prefix_cache.enabled", "gptlab_prefix_cache_enabled", "gauge", "1 if prefix caching is on."),
    ("kv_cache.prefix_cache.hits", "gptlab_prefix_cache_hits_total", "counter", "Prompt blocks found cached."),
    ("kv_cache.prefix_cache.misses", "gptlab_prefix_cache_misses_total", "counter", "Prompt blocks computed."),
    ("kv_cache.prefix_cache.evictions", "gptlab_prefix_cache_evictions_total", "counter", "Cached blocks evicted."),
    ("kv_cache.prefix_cache.hit_rate", "gptlab_prefix_cache_hit_rate", "gauge", "Prompt blocks found cached, a share."),
    ("speculative.drafted", "gptlab_speculative_drafted_tokens_total", "counter", "Draft tokens proposed."),
    ("speculative.accepted", "gptlab_speculative_accepted_tokens_total", "counter", "Draft tokens accepted."),
    ("speculative.acceptance_rate", "gptlab_speculative_acceptance_rate", "gauge", "Draft tokens accepted, a share."),
    ("speculative.tokens_per_step", "gptlab_speculative_tokens_per_step", "gauge", "Tokens per verification step."),
]
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The server's metrics: a registry of its own (several apps in one process never collide)."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]], http: Any, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Snapshot(stats, http, model_name))
        r = self.registry
        self.ttft = Histogram("gptlab_time_to_first_token_seconds", "From submission to a sequence's first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("gptlab_inter_token_latency_seconds", "Between consecutive tokens of a sequence.",
                             buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("gptlab_e2e_request_latency_seconds", "From submission to a sequence's end.",
                             buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("gptlab_prompt_tokens", "Prompt tokens of finished sequences.", registry=r)

    # The engine's observer (`gptlab.serve.engine.Observer`); prometheus_client is thread-safe.
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, seconds: float, prompt_tokens: int) -> None:
        self.e2e.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Snapshot:
    """Reads the engine's counters and the HTTP responses at each scrape."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]], http: Any, model_name: str) -> None:
        self.stats, self.http, self.model_name = stats, http, model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        info = GaugeMetricFamily("gptlab_info", "The model served and the KV cache's storage.",
                                 labels=["model", "backend", "kv_dtype"])  # fmt: skip
        storage = [str(_get(stats, "kv_cache.backend")), str(_get(stats, "kv_cache.kv_dtype"))]
        info.add_metric([self.model_name, *storage], 1)
        yield info
        for key, name, kind, help in _STATS:
            value = _get(stats, key)
            if not isinstance(value, bool | int | float):
                continue
            if kind == "counter":
                yield CounterMetricFamily(name.removesuffix("_total"), help, value=float(value))
            else:
                yield GaugeMetricFamily(name, help, value=float(value))
        total, used = _get(stats, "kv_cache.blocks_total"), _get(stats, "kv_cache.blocks_in_use")
        if isinstance(total, int) and isinstance(used, int) and total:
            yield GaugeMetricFamily("gptlab_kv_cache_usage", "KV cache blocks in use / blocks.", value=used / total)
        codes = CounterMetricFamily("gptlab_http_responses", "HTTP responses sent, by status code.", labels=["code"])
        for code, n in sorted(self.http.responses.items()):
            codes.add_metric([str(code)], n)
        yield codes
        requests = CounterMetricFamily("gptlab_requests", "HTTP requests answered, by endpoint and status.",
                                       labels=["endpoint", "status"])  # fmt: skip
        for (endpoint, code), n in sorted(self.http.by_endpoint.items()):
            requests.add_metric([endpoint, str(code)], n)
        yield requests


def _get(stats: Mapping[str, Any], key: str) -> Any:
    value: Any = stats
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value
