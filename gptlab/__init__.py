"""gptlab: the GPT-2 / GPT-3 family, from tokenizer to server."""

from __future__ import annotations

__version__ = "0.1.0"

from gptlab.config import ModelConfig  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.presets import PRESETS, preset  # noqa: E402

__all__ = ["GPT", "ModelConfig", "PRESETS", "Tokenizer", "__version__", "preset"]


def __getattr__(name: str):
    # Imported on first use so `import gptlab` stays light (no tokenizer libraries loaded).
    if name == "Tokenizer":
        from gptlab.tokenizer import Tokenizer

        return Tokenizer
    if name == "generate":
        from gptlab.infer import generate

        return generate
    raise AttributeError(f"module 'gptlab' has no attribute {name!r}")
