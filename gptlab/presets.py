"""Named model shapes: data, each with its source."""

from __future__ import annotations

import dataclasses
from typing import Any

from gptlab.config import ModelConfig

# GPT-2 (Radford et al. 2019, Table 2; released checkpoints on the Hugging Face hub: gpt2, gpt2-medium,
# gpt2-large, gpt2-xl). Context 1024, vocabulary 50257, dense attention.
_GPT2 = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}

# GPT-3 (Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1). Context 2048,
# GPT-2's vocabulary, dense and locally banded attention alternating (section 2.1). The paper does not
# give the band width; 256 is the window GPT-Neo chose when reproducing this pattern.
_GPT3 = {
    "gpt3-small": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt3-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt3-large": dict(n_layer=24, n_head=16, n_embd=1536),
    # Table 2.1 lists 24 heads of size 128 with d_model 2048, which is inconsistent (24 * 128 = 3072);
    # we keep d_model and head size 128, so 16 heads.
    "gpt3-xl": dict(n_layer=24, n_head=16, n_embd=2048),
    "gpt3-2.7b": dict(n_layer=32, n_head=32, n_embd=2560),
    "gpt3-6.7b": dict(n_layer=32, n_head=32, n_embd=4096),
    # Table 2.1 lists d_model 5140, which 40 heads cannot split; 5120 = 40 x 128 keeps its head size.
    "gpt3-13b": dict(n_layer=40, n_head=40, n_embd=5120),
    "gpt3-175b": dict(n_layer=96, n_head=96, n_embd=12288),
}

# The paper's nominal sizes, for the tests that check our counts against them.
GPT3_NOMINAL_PARAMS = {
    "gpt3-small": 125e6,
    "gpt3-medium": 350e6,
    "gpt3-large": 760e6,
    "gpt3-xl": 1.3e9,
    "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9,
    "gpt3-13b": 13.0e9,
    "gpt3-175b": 175.0e9,
}

# Tiny shapes of our own that train on a laptop CPU in minutes; small vocabularies to match a BPE
# trained with `gptlab tokenizer train` (or the default pipeline of `gptlab train`).
_TINY = {
    "nano": dict(n_layer=4, n_head=4, n_embd=128, n_ctx=256, vocab_size=4096),  # ~1.3M
    "micro": dict(n_layer=6, n_head=6, n_embd=384, n_ctx=256, vocab_size=8192),  # ~14M
    "nano-gpt3": dict(
        n_layer=4,
        n_head=4,
        n_embd=128,
        n_ctx=256,
        vocab_size=4096,
        attn_pattern="alternating",
        local_window=64,
    ),
}

PRESETS: dict[str, dict[str, Any]] = {
    **{k: dict(v, n_ctx=1024, vocab_size=50257) for k, v in _GPT2.items()},
    **{
        k: dict(v, n_ctx=2048, vocab_size=50257, attn_pattern="alternating", local_window=256)
        for k, v in _GPT3.items()
    },
    **_TINY,
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of preset `name`, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown ModelConfig fields {unknown}; valid fields: {sorted(valid)}")
    return ModelConfig(**{"name": name, **PRESETS[name], **overrides})


def preset_rows() -> list[dict[str, Any]]:
    """One row per preset for `gptlab configs`: shape, parameters and forward GFLOPs per token."""
    rows = []
    for name in PRESETS:
        c = preset(name)
        rows.append(
            {
                "name": name,
                "n_layer": c.n_layer,
                "d_model": c.n_embd,
                "n_head": c.n_head,
                "n_ctx": c.n_ctx,
                "vocab": c.vocab_size,
                "attention": "dense" if c.attn_pattern == "dense" else f"dense/local({c.local_window})",
                "n_params": c.n_params(),
                "n_params_non_embedding": c.n_params(embeddings=False),
                "fwd_gflops_per_token": round(c.flops_per_token() / 1e9, 4),
            }
        )
    return rows
