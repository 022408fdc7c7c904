"""Text generation: a KV-cached decoder, sampling and beam search, stop sequences, streaming.

One run preallocates a `KVCache` for prompt + new tokens, prefills the (left-padded) prompts in one
forward pass, then feeds one token per row per step. Choosing tokens is `gptlab.sampling`'s job.
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gptlab.decoder import Decoder
from gptlab.model import GPT
from gptlab.sampling import SamplingParams, make_generator, process_logits, sample_next, top_logprobs

__all__ = [
    "Completion",
    "Decoder",
    "SamplingParams",
    "TokenLogprob",
    "generate",
    "generate_ids",
    "process_logits",
    "sample_next",
    "stream",
]


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...
    @property
    def eot_id(self) -> int: ...


@dataclass
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    """Log-probability under the model (before penalties and temperature), as OpenAI reports it."""
    top: list[tuple[str, float]]
    """The `logprobs` most likely tokens at this step with their log-probabilities."""


@dataclass
class Completion:
    text: str
    """Generated text, without the prompt, the end-of-text token or the stop sequence."""
    token_ids: list[int]
    """Generated tokens; on a stop sequence, those that begin before it."""
    finish_reason: str
    """'stop' (end-of-text token or stop sequence) or 'length' (max_new_tokens reached)."""
    logprobs: list[TokenLogprob] | None
    prompt_index: int


# ---- prompts -------------------------------------------------------------------------------------
def fit_prompts(prompts: list[list[int]], n_ctx: int, max_new_tokens: int, truncate: bool = True) -> list[list[int]]:
    """Left-truncate prompts so prompt + max_new_tokens fits the context (with a warning), or raise."""
    if max_new_tokens >= n_ctx:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context of {n_ctx} tokens; "
            f"use at most {n_ctx - 1}"
        )
    room = n_ctx - max_new_tokens
    out = []
    for i, p in enumerate(prompts):
        if len(p) > room:
            msg = (
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} only {room} fit the "
                f"context of {n_ctx}"
            )
            if not truncate:
                raise ValueError(msg + "; shorten it, lower max_new_tokens, or allow truncation")
            warnings.warn(msg + f": keeping its last {room} tokens", stacklevel=3)
            p = p[-room:]
        out.append(list(p))
    return out


def _encode_prompts(tokenizer: TextTokenizer, prompts: str | Sequence[str]) -> list[list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass a string or a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is a {type(p).__name__}, expected str")
    return [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]


def _params(params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    return params.updated(**overrides)


# ---- text bookkeeping: incremental UTF-8, stop sequences -----------------------------------------
class _TextTracker:
    """Decodes a row's tokens incrementally (never splitting a UTF-8 character), finds stop sequences
    across token boundaries, and holds back text that could still become a stop sequence."""

    def __init__(self, tokenizer: TextTokenizer, stops: Sequence[str]) -> None:
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.emitted, self.starts = "", 0, []
        self.stop_at: int | None = None

    def push(self, token_id: int) -> bool:
        """Add one token; True when the text now contains a stop sequence (the text is cut before it)."""
        before = len(self.text)
        self.starts.append(before)
        self.text += self.utf8.decode(self.tokenizer.decode_bytes([token_id]))
        if not self.stops:
            return False
        start = max(0, before - self.hold)
        found = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if not found:
            return False
        self.stop_at = min(found)
        self.text = self.text[: self.stop_at]
        return True

    def finish(self) -> None:
        if self.stop_at is None:
            self.text += self.utf8.decode(b"", final=True)
            self.hold = 0

    def delta(self, final: bool = False) -> str:
        """Text not yet returned that can no longer turn into a stop sequence."""
        safe = len(self.text)
        if not final and self.stop_at is None:
            for k in range(min(self.hold, safe), 0, -1):
                if any(s.startswith(self.text[-k:]) for s in self.stops):
                    safe -= k
                    break
        out, self.emitted = self.text[self.emitted : safe], max(self.emitted, safe)
        return out

    def kept_tokens(self) -> int:
        return len(self.starts) if self.stop_at is None else sum(s < self.stop_at for s in self.starts)


@dataclass
class _Row:
    prompt: list[int]
    prompt_index: int
    generator: torch.Generator | None
    tracker: _TextTracker | None
    ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None


# ---- sampling / greedy ---------------------------------------------------------------------------
def _sampling_loop(
    model: GPT,
    rows: list[_Row],
    params: SamplingParams,
    eos_id: int | None,
    tokenizer: TextTokenizer | None,
    compile: bool,
) -> Iterator[None]:
    """Decode every row until it stops; yields after each step (for streaming). Rows are updated in
    place. Once half the rows still in the batch have finished, the batch is compacted (eager only:
    a compiled step keeps its shapes)."""
    n = params.n
    prompts = [r.prompt for r in rows[::n]]
    decoder = Decoder(model, len(prompts), max(map(len, prompts)) + params.max_new_tokens, compile=compile)
    logits = decoder.prefill(prompts)
    if n > 1:
        repeat = torch.arange(len(prompts)).repeat_interleave(n)
        decoder.reorder(repeat)
        logits = logits.index_select(0, repeat.to(logits.device))
    live = list(rows)  # rows still in the decoder's batch, in its order
    for step in range(params.max_new_tokens):
        with torch.inference_mode():
            prompt_ids = [r.prompt for r in live] if params.repetition_penalty != 1 else None
            processed = process_logits(logits, [r.ids for r in live], params, prompt_ids)
            generators = [r.generator for r in live] if params.seed is not None else None
            chosen = sample_next(processed, params, generators)
            if params.logprobs is not None:
                lp, top_lp, top_ids = (t.tolist() for t in top_logprobs(logits, chosen, params.logprobs))
        for b, (row, token) in enumerate(zip(live, chosen.tolist(), strict=True)):
            if row.finish_reason is not None:
                continue
            if token == eos_id:
                row.finish_reason = "stop"
                continue
            row.ids.append(token)
            if row.logprobs is not None and tokenizer is not None:
                top = [(tokenizer.decode([i]), v) for i, v in zip(top_ids[b], top_lp[b], strict=True)]
                row.logprobs.append(TokenLogprob(tokenizer.decode([token]), token, lp[b], top))
            if row.tracker is not None and row.tracker.push(token):
                row.finish_reason = "stop"
            elif step + 1 == params.max_new_tokens:
                row.finish_reason = "length"
        yield
        keep = [b for b, r in enumerate(live) if r.finish_reason is None]
        if not keep:
            break
        if not compile and len(keep) <= len(live) // 2:
            index = torch.tensor(keep)
            decoder.reorder(index)
            chosen = chosen.index_select(0, index.to(chosen.device))
            live = [live[b] for b in keep]
        logits = decoder.step(chosen)
    for r in rows:
        r.finish_reason = r.finish_reason or "length"


def _make_rows(prompts: list[list[int]], params: SamplingParams, tokenizer: TextTokenizer | None) -> list[_Row]:
    return [
        _Row(
            prompt=p,
            prompt_index=i,
            generator=make_generator(params.seed, j),
            tracker=_TextTracker(tokenizer, params.stop) if tokenizer is not None else None,
            ids=[],
            logprobs=[] if params.logprobs is not None else None,
        )
        for i, p in enumerate(prompts)
        for j in range(params.n)
    ]


def _completion(row: _Row) -> Completion:
    tracker = row.tracker
    assert tracker is not None
    tracker.finish()
    keep = tracker.kept_tokens()
    return Completion(
        text=tracker.text,
        token_ids=row.ids[:keep],
        finish_reason=row.finish_reason or "length",
        logprobs=None if row.logprobs is None else row.logprobs[:keep],
        prompt_index=row.prompt_index,
    )


class _EvalMode:
    """Eval mode for the duration of a run (no dropout), restoring the caller's mode after."""

    def __init__(self, model: GPT) -> None:
        self.model, self.was_training = model, model.training
        # Setting the mode walks every module (~1 ms each way for GPT-2): skip it when nothing trains.
        self.switch = any(m.training for m in model.modules())

    def __enter__(self) -> None:
        if self.switch:
            self.model.eval()

    def __exit__(self, *exc: object) -> None:
        if self.switch:
            self.model.train(self.was_training)


# ---- public API ----------------------------------------------------------------------------------
def generate(
    model: GPT,
    tokenizer: TextTokenizer,
    prompts: str | Sequence[str],
    params: SamplingParams | None = None,
    *,
    truncate: bool = True,
    compile: bool = False,
    **kwargs: Any,
) -> list[Completion]:
    """Complete each prompt `params.n` times; completions ordered by prompt, then sample.

    Keyword arguments override fields of `params` (`generate(m, tok, "Hi", temperature=0)`).
    Prompts of different lengths share one left-padded batch; each row stops on its own.
    """
    params = _params(params, kwargs)
    ids = fit_prompts(_encode_prompts(tokenizer, prompts), model.config.n_ctx, params.max_new_tokens, truncate)
    with _EvalMode(model):
        if params.num_beams > 1:
            from gptlab.beam import beam_search

            if params.logprobs is not None:
                raise ValueError("logprobs are not available with beam search (num_beams > 1)")
            return beam_search(model, ids, params, tokenizer.eot_id, tokenizer, compile=compile)
        rows = _make_rows(ids, params, tokenizer)
        for _ in _sampling_loop(model, rows, params, tokenizer.eot_id, tokenizer, compile):
            pass
    return [_completion(r) for r in rows]


def stream(
    model: GPT,
    tokenizer: TextTokenizer,
    prompt: str,
    params: SamplingParams | None = None,
    *,
    truncate: bool = True,
    compile: bool = False,
    **kwargs: Any,
) -> Iterator[str]:
    """Text deltas of one completion as tokens are generated; never splits a UTF-8 character, and
    holds back text that might still be the start of a stop sequence."""
    params = _params(params, kwargs)
    if not isinstance(prompt, str):
        raise ValueError(f"stream takes one prompt string, got {type(prompt).__name__}")
    if params.n != 1 or params.num_beams != 1:
        raise ValueError("stream produces one completion: use n=1 and num_beams=1 (or generate())")
    ids = fit_prompts(_encode_prompts(tokenizer, prompt), model.config.n_ctx, params.max_new_tokens, truncate)
    rows = _make_rows(ids, params, tokenizer)

    def deltas() -> Iterator[str]:
        tracker = rows[0].tracker
        assert tracker is not None
        with _EvalMode(model):
            for _ in _sampling_loop(model, rows, params, tokenizer.eot_id, tokenizer, compile):
                if text := tracker.delta():
                    yield text
        tracker.finish()
        if text := tracker.delta(final=True):
            yield text

    return deltas()


def generate_ids(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    eos_id: int | None = None,
    *,
    truncate: bool = True,
    compile: bool = False,
    **kwargs: Any,
) -> list[list[int]]:
    """Token-level generation: new ids per prompt (n per prompt, in order), the eos token excluded.

    Stop strings and logprobs need a tokenizer: use `generate`. An empty prompt needs `eos_id`.
    """
    params = _params(params, kwargs)
    if params.stop:
        raise ValueError("stop strings need a tokenizer; use generate() or stop on eos_id")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given: pass a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if not p:
            if eos_id is None:
                raise ValueError(f"prompt {i} is empty; pass eos_id to start it from the end-of-text token")
            p.append(eos_id)
    prompts = fit_prompts(prompts, model.config.n_ctx, params.max_new_tokens, truncate)
    with _EvalMode(model):
        if params.num_beams > 1:
            from gptlab.beam import beam_search

            return [c.token_ids for c in beam_search(model, prompts, params, eos_id, None, compile=compile)]
        rows = _make_rows(prompts, params, None)
        for _ in _sampling_loop(model, rows, params, eos_id, None, compile):
            pass
    return [r.ids for r in rows]


# ---- command line ----------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_for_generation(
    checkpoint: str,
    *,
    dtype: str = "float32",
    quantize: str | None = None,
    device: str = "cpu",
    tokenizer: str | None = None,
    pack: bool = True,
) -> tuple[GPT, Any]:
    """Model (see `prepare_model`) and tokenizer of a gptlab run / checkpoint or Hugging Face GPT-2 directory."""
    from gptlab.checkpoint import load_model, load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    model = load_model(checkpoint, device=device, dtype=DTYPES[dtype])
    return prepare_model(model, quantize=quantize, pack=pack), load_tokenizer(tokenizer or checkpoint)


def prepare_model(model: GPT, *, quantize: str | None = None, pack: bool = True, kernels: bool = True) -> GPT:
    """Swap a CPU model's linear layers for faster kernels (see `gptlab.quantize`), in place.

    Where `gptlab.cpu_kernels` builds (a C compiler and AVX2): float32, bfloat16 or (quantize='int8')
    int8 weights on gptlab's few-row kernels, float32 activations. Elsewhere: float32 weights
    prepacked for oneDNN; bfloat16 without native bf16 matmuls in fbgemm's half-precision GEMM;
    int8 in fbgemm's dynamic int8 GEMM. `compile=True` needs the plain layers: pass pack=False (int8
    cannot be compiled). kernels=False: torch's kernels even where gptlab's build (for comparison).
    """
    from gptlab import cpu_kernels
    from gptlab.quantize import STORAGE, pack_float32, pack_half, quantize_int8, use_cpu_kernels

    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be 'int8' or None, got {quantize!r}")
    weight = model.transformer.wte.weight
    if pack and weight.device.type == "cpu":
        storage = "int8" if quantize == "int8" else {v: k for k, v in STORAGE.items()}.get(weight.dtype)
        if storage is not None and kernels and cpu_kernels.available():
            return use_cpu_kernels(model, storage)
    if quantize == "int8":
        quantize_int8(model).float()
    elif pack and weight.device.type == "cpu":
        if weight.dtype == torch.float32:
            pack_float32(model)
        elif weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            pack_half(model)
    return model


def run_generate(
    model: GPT,
    tokenizer: TextTokenizer,
    prompt: str | None,
    params: SamplingParams,
    *,
    interactive: bool = False,
    truncate: bool = True,
    compile: bool = False,
    out: Any = None,
) -> int:
    """What `gptlab generate` does: stream one completion to `out` (stdout) as tokens arrive, print
    n completions / beams one after another, and with `interactive` read prompts from stdin."""
    import sys

    out = out or sys.stdout
    params.validate()

    def complete(text: str) -> None:
        if params.n == 1 and params.num_beams == 1:
            for delta in stream(model, tokenizer, text, params, truncate=truncate, compile=compile):
                out.write(delta)
                out.flush()
            out.write("\n")
            return
        for i, c in enumerate(generate(model, tokenizer, text, params, truncate=truncate, compile=compile)):
            out.write(f"--- completion {i + 1} ({c.finish_reason}) ---\n{c.text}\n")
        out.flush()

    if prompt is not None:
        complete(prompt)
    if not interactive:
        if prompt is None:
            raise ValueError("give a PROMPT, or -i for an interactive prompt loop")
        return 0
    while True:
        try:
            text = input("> ")
        except EOFError:
            out.write("\n")
            return 0
        if text.strip() in ("exit", "quit"):
            return 0
        complete(text)
