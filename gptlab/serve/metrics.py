"""GET /metrics: the engine's statistics and the responses sent, in Prometheus' text format (0.0.4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (key in Engine.stats(), metric name, type, help); nested keys are joined with '.'
_METRICS = [
    ("active", "gptlab_sequences_active", "gauge", "Sequences decoding now."),
    ("waiting", "gptlab_requests_waiting", "gauge", "Requests queued or preempted."),
    ("slots", "gptlab_sequences_max", "gauge", "Sequences that may decode together (--max-concurrent)."),
    ("steps", "gptlab_decode_steps_total", "counter", "Batched decoding steps run."),
    ("max_batch", "gptlab_decode_batch_max", "gauge", "Largest batch decoded in one step."),
    ("completed", "gptlab_requests_completed_total", "counter", "Requests finished."),
    ("cancelled", "gptlab_requests_cancelled_total", "counter", "Requests cancelled (client left)."),
    ("failed", "gptlab_requests_failed_total", "counter", "Requests failed by an engine error."),
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
]


def prometheus_text(stats: Mapping[str, Any], responses: Mapping[int, int], model_name: str) -> str:
    """The exposition text of `stats` (Engine.stats()) and `responses` (status code -> count)."""
    lines = [
        "# HELP gptlab_info The model served and the KV cache's storage.",
        "# TYPE gptlab_info gauge",
        f'gptlab_info{{model="{_label(model_name)}",backend="{_label(_get(stats, "kv_cache.backend"))}",'
        f'kv_dtype="{_label(_get(stats, "kv_cache.kv_dtype"))}"}} 1',
    ]
    for key, name, kind, help in _METRICS:
        value = _get(stats, key)
        if isinstance(value, bool | int | float):
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]
    lines += ["# HELP gptlab_http_responses_total HTTP responses sent, by status code.",
              "# TYPE gptlab_http_responses_total counter"]  # fmt: skip
    lines += [f'gptlab_http_responses_total{{code="{code}"}} {n}' for code, n in sorted(responses.items())]
    return "\n".join(lines) + "\n"


def _get(stats: Mapping[str, Any], key: str) -> Any:
    value: Any = stats
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _number(value: bool | int | float) -> str:
    return str(int(value)) if isinstance(value, bool | int) else repr(float(value))


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
