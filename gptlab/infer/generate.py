"""Text generation on the inference engine: sampling and beam search, stop sequences, streaming.

Each call builds an `InferenceEngine` with a KV pool sized for its prompts, prefills every prompt once
(n samples fork its blocks), then decodes one token per live row per step; `gptlab.infer.rows` chooses
the tokens. With `speculative=` a step drafts and verifies several tokens per row
(`gptlab.infer.speculative`). Prompts of any lengths share a batch without padding: each row has its own positions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from gptlab.infer.cache import BLOCK_SIZE
from gptlab.infer.engine import InferenceEngine
from gptlab.infer.rows import Completion, Row, TextTokenizer, TokenLogprob, advance, make_rows, start
from gptlab.infer.sampling import SamplingParams
from gptlab.infer.speculative import Speculation, Speculator
from gptlab.model import GPT

__all__ = ["Completion", "SamplingParams", "Speculation", "TokenLogprob", "generate", "generate_ids", "stream"]


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


def encode_prompts(tokenizer: TextTokenizer, prompts: str | Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt (an empty prompt starts from the end-of-text token)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass a string or a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is a {type(p).__name__}, expected str")
    return [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]


def _params(params: SamplingParams | None, overrides: dict[str, Any], model: GPT) -> SamplingParams:
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    params = params.updated(**overrides)
    check_vocab(params, model.config.vocab_size)
    return params


def check_vocab(params: SamplingParams, vocab: int) -> None:
    """Raise ValueError for a logit_bias token id outside the model's vocabulary (before any work)."""
    outside = [t for t in params.logit_bias if t >= vocab]
    if outside:
        raise ValueError(f"logit_bias names token id {outside[0]}, outside the vocabulary of {vocab} tokens")


def engine_for(
    model: GPT, prompts: Sequence[Sequence[int]], params: SamplingParams, compile: bool = False
) -> InferenceEngine:
    """An engine whose KV pool holds exactly what this run can need: every prompt once, and every row
    (sample or beam) its own new tokens plus the blocks that copy-on-write and forking may take."""
    rows = len(prompts) * max(params.n, params.num_beams)
    tokens = sum(len(p) + BLOCK_SIZE for p in prompts) + rows * (params.max_new_tokens + 2 * BLOCK_SIZE)
    return InferenceEngine(model, kv_cache_tokens=tokens, compile=compile)


class _EvalMode:
    """Eval mode for the duration of a run (no dropout), restoring the caller's mode after; the draft
    model of `speculation` too."""

    def __init__(self, model: GPT, speculation: Speculation | None = None) -> None:
        draft = speculation.draft if speculation is not None else None
        self.models = [(m, m.training) for m in (model, draft) if m is not None]
        # Setting the mode walks every module (~1 ms each way for GPT-2): skip it when nothing trains.
        self.switch = any(m.training for model, _ in self.models for m in model.modules())

    def __enter__(self) -> None:
        if self.switch:
            for model, _ in self.models:
                model.eval()

    def __exit__(self, *exc: object) -> None:
        if self.switch:
            for model, was_training in self.models:
                model.train(was_training)


# ---- the sampling loop ---------------------------------------------------------------------------
def decode_rows(
    engine: InferenceEngine, rows: list[Row], eos_id: int | None, speculation: Speculation | None = None
) -> Iterator[None]:
    """Decode every row until it finishes, yielding after each step (for streaming); rows are updated
    in place and their blocks go back to the pool as they finish. With `speculation` each step after
    the first drafts and verifies up to K + 1 tokens per row."""
    n_ctx = engine.model.config.n_ctx
    live = [r for r in rows if r.params.max_new_tokens > 0]
    for r in rows:
        if not r.params.max_new_tokens:
            r.finish_reason = "length"
    if not live:
        return
    speculator = Speculator(engine, speculation, live) if speculation is not None else None
    try:
        advance(live, start(engine, live), eos_id, n_ctx)
        while True:
            yield
            for r in live:
                if r.done and r.seq is not None:
                    engine.free(r.seq)
                if r.done and speculator is not None:
                    speculator.release(r)
            live = [r for r in live if not r.done]
            if not live:
                return
            if speculator is not None:
                speculator.step(live, eos_id)
            else:
                advance(live, engine.forward([r.seq for r in live]), eos_id, n_ctx)
    finally:
        if speculator is not None:
            speculator.close()


def _engine(
    model: GPT, engine: InferenceEngine | None, prompts: list[list[int]], params: SamplingParams, compile: bool
) -> InferenceEngine:
    if engine is None:
        return engine_for(model, prompts, params, compile)
    if engine.model is not model:
        raise ValueError("the engine runs another model; build an InferenceEngine of this one")
    return engine


def _run(engine: InferenceEngine, rows: list[Row], eos_id: int | None, speculation: Speculation | None) -> None:
    try:
        for _ in decode_rows(engine, rows, eos_id, speculation):
            pass
    finally:  # an error (or a full pool) must not leave blocks held in a long-lived engine
        for r in rows:
            if r.seq is not None:
                engine.free(r.seq)
                r.seq = None
    raise_failures(rows)


def _speculation(speculative: Speculation | None, model: GPT, params: SamplingParams) -> Speculation | None:
    if speculative is None:
        return None
    if not isinstance(speculative, Speculation):
        raise ValueError(f"speculative must be a Speculation, got {type(speculative).__name__}")
    if params.num_beams > 1:
        raise ValueError("speculative decoding samples or decodes greedily; it does not apply to beam search")
    return speculative.validate(model)


def raise_failures(rows: list[Row]) -> None:
    failed = [r for r in rows if r.error is not None]
    if failed:
        raise ValueError(f"generation failed for prompt {failed[0].prompt_index}: {failed[0].error}")


# ---- public API ----------------------------------------------------------------------------------
def generate(
    model: GPT,
    tokenizer: TextTokenizer,
    prompts: str | Sequence[str],
    params: SamplingParams | None = None,
    *,
    truncate: bool = True,
    compile: bool = False,
    engine: InferenceEngine | None = None,
    speculative: Speculation | None = None,
    **kwargs: Any,
) -> list[Completion]:
    """Complete each prompt `params.n` times; completions ordered by prompt, then sample.

    Keyword arguments override fields of `params` (`generate(m, tok, "Hi", temperature=0)`).
    Prompts of different lengths share one batch; each row stops on its own. `engine`: an
    `InferenceEngine` of `model` to run on (its prefix cache kept across calls); by default one sized
    for this call. `speculative`: a `Speculation` (draft model or prompt lookup) to decode with
    speculative decoding: the same output distribution (greedy: the same tokens), fewer target steps.
    """
    params = _params(params, kwargs, model)
    speculative = _speculation(speculative, model, params)
    ids = fit_prompts(encode_prompts(tokenizer, prompts), model.config.n_ctx, params.max_new_tokens, truncate)
    engine = _engine(model, engine, ids, params, compile)
    with _EvalMode(model, speculative):
        if params.num_beams > 1:
            from gptlab.infer.beam import beam_search

            if params.logprobs is not None:
                raise ValueError("logprobs are not available with beam search (num_beams > 1)")
            return beam_search(engine, ids, params, tokenizer.eot_id, tokenizer)
        rows = make_rows(ids, params, tokenizer)
        _run(engine, rows, tokenizer.eot_id, speculative)
    return [r.completion() for r in rows]


def stream(
    model: GPT,
    tokenizer: TextTokenizer,
    prompt: str,
    params: SamplingParams | None = None,
    *,
    truncate: bool = True,
    compile: bool = False,
    engine: InferenceEngine | None = None,
    speculative: Speculation | None = None,
    **kwargs: Any,
) -> Iterator[str]:
    """Text deltas of one completion as tokens are generated; never splits a UTF-8 character, and
    holds back text that might still be the start of a stop sequence."""
    params = _params(params, kwargs, model)
    if not isinstance(prompt, str):
        raise ValueError(f"stream takes one prompt string, got {type(prompt).__name__}")
    if params.n != 1 or params.num_beams != 1:
        raise ValueError("stream produces one completion: use n=1 and num_beams=1 (or generate())")
    speculative = _speculation(speculative, model, params)
    ids = fit_prompts(encode_prompts(tokenizer, prompt), model.config.n_ctx, params.max_new_tokens, truncate)
    rows = make_rows(ids, params, tokenizer)
    runner = _engine(model, engine, ids, params, compile)

    def deltas() -> Iterator[str]:
        tracker = rows[0].tracker
        assert tracker is not None
        try:
            with _EvalMode(model, speculative):
                for _ in decode_rows(runner, rows, tokenizer.eot_id, speculative):
                    if text := tracker.delta():
                        yield text
        finally:  # also when the caller stops reading early
            for r in rows:
                if r.seq is not None:
                    runner.free(r.seq)
                    r.seq = None
        raise_failures(rows)
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
    engine: InferenceEngine | None = None,
    speculative: Speculation | None = None,
    **kwargs: Any,
) -> list[list[int]]:
    """Token-level generation: new ids per prompt (n per prompt, in order), the eos token excluded.

    Stop strings and logprobs need a tokenizer: use `generate`. An empty prompt needs `eos_id`.
    """
    params = _params(params, kwargs, model)
    speculative = _speculation(speculative, model, params)
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
    engine = _engine(model, engine, prompts, params, compile)
    with _EvalMode(model, speculative):
        if params.num_beams > 1:
            from gptlab.infer.beam import beam_search

            return [c.token_ids for c in beam_search(engine, prompts, params, eos_id, None)]
        rows = make_rows(prompts, params, None)
        _run(engine, rows, eos_id, speculative)
    return [r.ids for r in rows]


# ---- command line ----------------------------------------------------------------------------------
def cache_line(engine: InferenceEngine) -> str:
    """One line of the engine's KV-cache counters (`--verbose`)."""
    s = engine.summary()
    prefix = s["prefix_cache"]
    looked = prefix["hits"] + prefix["misses"]
    return (
        f"[kv cache: {s['blocks_in_use']}/{s['blocks_total']} blocks of {s['block_size']} in use "
        f"(peak {s['blocks_peak']}, {s['blocks_cached']} cached); prefix cache: {prefix['hits']} of {looked} "
        f"prompt tokens reused ({100 * prefix['hit_rate']:.0f}%); backend {s['backend']}, {s['kv_dtype']}]"
    )


def speculation_line(engine: InferenceEngine) -> str:
    """One line of the engine's speculative-decoding counters (`--verbose`)."""
    s = engine.speculation
    rate = s.accepted / s.drafted if s.drafted else 0.0
    per_step = s.tokens / s.steps if s.steps else 0.0
    return (
        f"[speculative: {s.accepted} of {s.drafted} drafted tokens accepted ({100 * rate:.0f}%); "
        f"{per_step:.2f} tokens per target step over {s.steps} row-steps]"
    )


def run_generate(
    model: GPT,
    tokenizer: TextTokenizer,
    prompt: str | None,
    params: SamplingParams,
    *,
    interactive: bool = False,
    truncate: bool = True,
    compile: bool = False,
    verbose: bool = False,
    speculative: Speculation | None = None,
    out: Any = None,
) -> int:
    """What `gptlab generate` does: stream one completion to `out` (stdout) as tokens arrive, print
    n completions / beams one after another, and with `interactive` read prompts from stdin. One
    engine serves the session, so prompts that start alike (a conversation) reuse cached blocks;
    `verbose` prints its KV-cache and prefix-cache counters (and with `speculative`, the acceptance
    rate and tokens per target step) to stderr after each completion."""
    import sys

    out = out or sys.stdout
    params.validate()
    check_vocab(params, model.config.vocab_size)
    speculative = _speculation(speculative, model, params)
    rows = max(params.n, params.num_beams)
    n_ctx = model.config.n_ctx
    engine = InferenceEngine(model, kv_cache_tokens=(rows + 1) * (n_ctx + 2 * BLOCK_SIZE), compile=compile)

    def complete(text: str) -> None:
        if params.n == 1 and params.num_beams == 1:
            deltas = stream(model, tokenizer, text, params, truncate=truncate, engine=engine, speculative=speculative)
            for delta in deltas:
                out.write(delta)
                out.flush()
            out.write("\n")
        else:
            completions = generate(
                model, tokenizer, text, params, truncate=truncate, engine=engine, speculative=speculative
            )
            for i, c in enumerate(completions):
                out.write(f"--- completion {i + 1} ({c.finish_reason}) ---\n{c.text}\n")
            out.flush()
        if verbose:
            print(cache_line(engine), file=sys.stderr, flush=True)
            if speculative is not None:
                print(speculation_line(engine), file=sys.stderr, flush=True)

    return prompt_loop(complete, prompt, interactive, out)


def prompt_loop(complete: Callable[[str], None], prompt: str | None, interactive: bool, out: Any) -> int:
    """`gptlab generate`'s session: complete `prompt`, then with `interactive` each line read from stdin
    until end of input or 'exit' / 'quit'."""
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
