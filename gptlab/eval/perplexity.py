"""Sliding-window perplexity and bits per byte of text files.

Windows follow Hugging Face's perplexity guide (https://huggingface.co/docs/transformers/perplexity):
windows of `max_length` tokens start every `stride` tokens; each scores only the tokens that the
previous window did not, the rest of the window serving as context. stride = max_length gives
disjoint windows (fast, little context for a window's first tokens); a smaller stride gives every
scored token at least max_length - stride tokens of context. As in the guide, a window's first token
is only context, so with stride = max_length the first token of every window after the first is not
scored (`tokens` in the result counts what was).

By default the end-of-text token is put before each document so its first token is scored too (as
lm-eval's `loglikelihood_rolling` and GPT-2's evaluation do); `prepend_eot=False` scores tokens 1..n-1
exactly as the guide does. Bits per byte = total NLL in bits / UTF-8 bytes of the text: unlike
perplexity it does not depend on the tokenizer, so models with different vocabularies compare.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gptlab.eval.scoring import TextTokenizer, score_tokens
from gptlab.model import GPT


@dataclass
class PerplexityResult:
    tokens: int
    """Tokens scored."""
    nll_sum: float
    """Total negative log-likelihood, nats."""
    bytes: int
    """UTF-8 bytes of the text."""

    @property
    def nll(self) -> float:
        """Mean NLL per scored token, nats (perplexity = exp(nll))."""
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / math.log(2) / self.bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "nll": self.nll,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window over tokens [0, n_tokens): the guide's loop, where window
    [begin, end) scores its last n_scored tokens (token 0 never: it has no context)."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        n_scored = min(end - prev_end, end - begin - 1)
        if n_scored > 0:
            windows.append((begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def token_nll(
    model: GPT,
    ids: Sequence[int],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[float, int]:
    """(total NLL in nats, tokens scored) of token sequence `ids` under sliding windows."""
    max_length = max_length or model.config.n_ctx
    stride = stride or max_length // 2
    if not 2 <= max_length <= model.config.n_ctx:
        raise ValueError(f"max_length must be in [2, n_ctx={model.config.n_ctx}], got {max_length}")
    windows = sliding_windows(len(ids), max_length, stride)
    if not windows:
        raise ValueError(f"{len(ids)} token(s) leave nothing to score; perplexity needs at least 2")
    sequences = [list(ids[b:e]) for b, e, _ in windows]
    scored = score_tokens(
        model,
        sequences,
        [n for _, _, n in windows],
        batch_size=batch_size,
        progress=progress,
        desc="perplexity",
    )
    nll = -sum(float(lp.double().sum()) for lp, _ in scored)
    return nll, sum(n for _, _, n in windows)


def perplexity(
    model: GPT,
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    max_length: int | None = None,
    stride: int | None = None,
    prepend_eot: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity and bits per byte of `texts`, each scored as its own document."""
    total = PerplexityResult(tokens=0, nll_sum=0.0, bytes=0)
    for text in texts:
        ids = tokenizer.encode(text)
        if prepend_eot:
            ids = [tokenizer.eot_id, *ids]
        nll, n = token_nll(model, ids, max_length, stride, batch_size=batch_size, progress=progress)
        total.tokens += n
        total.nll_sum += nll
        total.bytes += len(text.encode("utf-8"))
    return total


def run_perplexity(
    checkpoint: str | Path,
    data: Sequence[str | Path],
    stride: int | None = None,
    max_length: int | None = None,
    out: str | Path | None = None,
    tokenizer: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    prepend_eot: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """`gptlab eval perplexity`: each file is one document; returns (and writes to `out`) a JSON-ready
    dict with the totals over all files and one entry per file."""
    from gptlab.checkpoint import atomic_write_text, load_model, load_tokenizer

    texts = []
    for path in map(Path, data):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist; pass UTF-8 text files to --data")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e}); perplexity reads plain text files") from None
        if not text:
            raise ValueError(f"{path} is empty; nothing to score")
        texts.append(text)
    model = load_model(checkpoint, device=device)
    tok = load_tokenizer(tokenizer or checkpoint)
    max_length = max_length or model.config.n_ctx
    stride = stride or max_length // 2
    files = []
    for path, text in zip(data, texts, strict=True):
        r = perplexity(model, tok, [text], max_length, stride, prepend_eot, batch_size, progress)
        files.append({"file": str(path), **r.to_dict()})
    total = PerplexityResult(
        tokens=sum(f["tokens"] for f in files),
        nll_sum=sum(f["nll_sum"] for f in files),
        bytes=sum(f["bytes"] for f in files),
    )
    result = {
        "checkpoint": str(checkpoint),
        **total.to_dict(),
        "stride": stride,
        "max_length": max_length,
        "prepend_eot": prepend_eot,
        "files": files,
    }
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result
