"""All of inference: the paged KV cache (`cache`), the cached forward step (`step`) and its CPU fast path
(`cpu`), the engine that owns them (`engine`), rows and sampling (`rows`, `sampling`), beam search,
constrained decoding (`constrain`), the generation API (`generate`), and model preparation (`prepare`,
`quantize`).

Imported lazily: `import gptlab.infer` loads nothing heavy until a name is used.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "generate": "gptlab.infer.generate",
    "generate_ids": "gptlab.infer.generate",
    "stream": "gptlab.infer.generate",
    "run_generate": "gptlab.infer.generate",
    "Completion": "gptlab.infer.rows",
    "TokenLogprob": "gptlab.infer.rows",
    "SamplingParams": "gptlab.infer.sampling",
    "Constraint": "gptlab.infer.constrain",
    "InferenceEngine": "gptlab.infer.engine",
    "KVPool": "gptlab.infer.cache",
    "prepare_model": "gptlab.infer.prepare",
    "load_for_generation": "gptlab.infer.prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gptlab.infer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
