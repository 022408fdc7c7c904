"""One row type and one sampling step, shared by `generate`, `stream`, evaluation and the server.

A `Row` is one completion being generated: its sequence in the KV pool, its sampling parameters and
private random generator, the tokens and text it produced, and why it finished. `advance` chooses the
next token of every row of a batch from its logits (`gptlab.infer.sampling`), records it and decides
whether the row is done; `start` prefills a batch of rows (one prefill per prompt, forked for n
samples). A fault in one row (non-finite logits, say) ends that row alone with an error.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from gptlab.infer.cache import Sequence as CacheSequence
from gptlab.infer.constrain import TokenMatcher, mask_logits
from gptlab.infer.engine import InferenceEngine
from gptlab.infer.sampling import SamplingParams, make_generator, process_logits, sample_checked, top_logprobs

log = logging.getLogger("gptlab.infer")

NOT_FINITE = "the model's next-token scores are not finite numbers (NaN or infinite)"
"""Why a row whose logits cannot be sampled failed (plain and speculative steps alike)."""


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


class TextTracker:
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


@dataclass(eq=False)
class Row:
    """One completion being generated."""

    prompt: list[int]
    params: SamplingParams
    prompt_index: int = 0
    sample: int = 0
    """Which of the prompt's `params.n` completions this is."""
    tracker: TextTracker | None = None
    generator: torch.Generator | None = None
    seq: CacheSequence | None = None
    matcher: TokenMatcher | None = None
    """Where the row is in its constraint's grammar (None: unconstrained)."""
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None
    """Why this row failed (then finish_reason is 'error')."""

    @property
    def index(self) -> int:
        """Choice index: prompt_index * n + sample."""
        return self.prompt_index * self.params.n + self.sample

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def fail(self, message: str) -> None:
        self.finish_reason, self.error = "error", message

    def completion(self) -> Completion:
        """The finished row as a `Completion` (text up to a stop sequence, its tokens and logprobs)."""
        tracker = self.tracker
        if tracker is None:
            return Completion("", list(self.ids), self.finish_reason or "length", self.logprobs, self.prompt_index)
        tracker.finish()
        keep = tracker.kept_tokens()
        logprobs = None if self.logprobs is None else self.logprobs[:keep]
        return Completion(tracker.text, self.ids[:keep], self.finish_reason or "length", logprobs, self.prompt_index)


def make_rows(
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    tokenizer: TextTokenizer | None,
    stops: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> list[Row]:
    """`params.n` rows per prompt, in order; each sample with its own generator stream (and, under a
    constraint, its own grammar state)."""
    stops = params.stop if stops is None else stops
    start_state = None
    if params.constraint is not None:
        if tokenizer is None:
            raise ValueError("constrained decoding needs a tokenizer: use generate(), not generate_ids()")
        start_state = TokenMatcher.start(params.constraint, tokenizer)
    return [
        Row(
            prompt=list(p),
            params=params,
            prompt_index=i,
            sample=j,
            tracker=TextTracker(tokenizer, stops) if tokenizer is not None else None,
            generator=make_generator(params.seed, j, device),
            logprobs=[] if params.logprobs is not None else None,
            matcher=start_state.fork() if start_state is not None else None,
        )
        for i, p in enumerate(prompts)
        for j in range(params.n)
    ]


def start(engine: InferenceEngine, rows: Sequence[Row], resume: Sequence[Row] = ()) -> Tensor:
    """Prefill `rows` (consecutive samples of one prompt share one prefill, then fork) and recompute
    the sequences of preempted `resume` rows; next-token logits (len(rows) + len(resume), V) float32,
    rows first. Raises OutOfBlocks (the caller frees what the rows hold)."""
    firsts: list[Row] = []
    for row in rows:
        if row.sample == 0 or not firsts or firsts[-1].prompt_index != row.prompt_index:
            row.seq = engine.sequence(row.prompt)
            firsts.append(row)
    for row in resume:  # everything it had: prompt + generated tokens, the last not yet fed
        row.seq = engine.sequence(row.prompt + row.ids)
    logits = engine.forward([r.seq for r in (*firsts, *resume)])
    out, k = [], 0
    for row in rows:
        if row.seq is None:  # a later sample of the prompt just prefilled
            row.seq = engine.fork(firsts[k - 1].seq)
            out.append(out[-1])
            continue
        out.append(logits[k : k + 1])
        k += 1
    out.extend(logits[k + i : k + i + 1] for i in range(len(resume)))
    return torch.cat(out)


def advance(rows: Sequence[Row], logits: Tensor, eos_id: int | None, n_ctx: int) -> list[int]:
    """Choose, record and check the next token of every row from its logits (B, V): the one sampling
    step of every decoding path. A row finishes on `eos_id`, a stop sequence, its token limit or the
    context's end; a row whose logits cannot be sampled fails alone. Unfinished rows get the token
    appended to their sequence, ready for the engine's next forward. A constrained row samples only
    among the tokens its grammar allows, and finishes when the grammar is complete. Returns the chosen
    tokens. (Speculative decoding verifies a draft per position with the same mask: `TokenMatcher`.)"""
    params = [r.params for r in rows]
    prompts = [r.prompt for r in rows] if any(p.repetition_penalty != 1 for p in params) else None
    matchers = [r.matcher for r in rows]
    allowed_logits = mask_logits(logits, matchers) if any(m is not None for m in matchers) else logits
    processed = process_logits(allowed_logits, [r.ids for r in rows], params, prompts)
    generators = [r.generator for r in rows]
    # A row whose logits cannot be sampled fails here, alone.
    tokens, broken = sample_checked(processed, params, generators if any(g is not None for g in generators) else None)
    want = [p.logprobs for p in params if p.logprobs is not None]
    if want:
        chosen = torch.tensor(tokens, device=logits.device)
        lp, top_v, top_i = (t.tolist() for t in top_logprobs(logits, chosen, max(want)))
    for b in (b for b, bad in enumerate(broken) if bad):
        matcher = rows[b].matcher
        if matcher is not None and matcher.error is not None:
            rows[b].fail(f"constrained decoding failed: {matcher.error}")
        else:
            rows[b].fail(NOT_FINITE)
    for b, (row, token) in enumerate(zip(rows, tokens, strict=True)):
        if row.done:
            continue
        try:
            record(row, token, eos_id, n_ctx, None if not want else (lp[b], top_v[b], top_i[b]))
            if not row.done and row.seq is not None:
                row.seq.tokens.append(token)
        except Exception as e:  # one row's bookkeeping (a tokenizer error, say) ends that row alone
            log.exception("row bookkeeping failed")
            row.fail(f"{type(e).__name__}: {e}")
    return tokens


def record(row: Row, token: int, eos_id: int | None, n_ctx: int, lp: tuple | None = None) -> None:
    """Add one chosen token to `row` (its text, its logprobs from `lp` = (logprob, top values, top ids))
    and finish the row on `eos_id`, a stop sequence, its token limit or the context's end. The row's
    cache sequence is the caller's to extend."""
    if token == eos_id:
        row.finish_reason = "stop"
        return
    row.ids.append(token)
    if row.matcher is not None:
        row.matcher.consume(token)
    if row.logprobs is not None and lp is not None:
        decode = row.tracker.tokenizer.decode if row.tracker is not None else str
        k = row.params.logprobs or 0
        top = [(decode([i]), v) for i, v in zip(lp[2][:k], lp[1][:k], strict=True)]
        row.logprobs.append(TokenLogprob(decode([token]), token, lp[0], top))
    if row.tracker is not None and row.tracker.push(token):
        row.finish_reason = "stop"
    elif row.matcher is not None and row.matcher.done:  # the structure is complete
        row.finish_reason = "stop"
    elif len(row.ids) >= row.params.max_new_tokens or len(row.prompt) + len(row.ids) >= n_ctx:
        row.finish_reason = "length"
