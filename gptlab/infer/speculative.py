"""Speculative decoding: a cheap drafter proposes K tokens, the target model checks them in one forward.

Each step every live row gets up to K draft tokens, from a smaller draft model with the same tokenizer
(Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling") or by prompt lookup: the
continuation of an earlier occurrence of the row's last n-gram (transformers' `prompt_lookup_num_tokens`,
vLLM's ngram drafter; a row drafts up to K, 2 more after a draft kept whole and 1 fewer after a cut
one, transformers' heuristic schedule). The target then computes the K + 1 positions of every row in
one engine forward and keeps the longest acceptable prefix of the draft plus one token of its own, so a
step yields 1 to K + 1 tokens. Rejected tokens are cut from the paged cache (`InferenceEngine.truncate`).

Acceptance keeps the target's distribution exactly: with p and q the processed (penalties, temperature,
top-k / top-p / min-p) distributions of target and drafter, a draft token x is accepted with probability
min(1, p(x) / q(x)); the first rejected one is replaced by a draw from norm(max(0, p - q)); when all K
are accepted a bonus token is drawn from the target's next distribution. Prompt lookup's draft is
deterministic (q one-hot). Greedy rows accept a draft token iff it is the target's argmax, so greedy
output is token for token the target's own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gptlab.infer.cache import BLOCK_SIZE, OutOfBlocks
from gptlab.infer.cache import Sequence as CacheSequence
from gptlab.infer.constrain import apply_masks
from gptlab.infer.engine import InferenceEngine
from gptlab.infer.rows import NOT_FINITE, Row, record
from gptlab.infer.sampling import best_tokens, process_logits, sample_checked, top_logprobs
from gptlab.model import GPT

log = logging.getLogger("gptlab.infer")


@dataclass
class Speculation:
    """How to draft tokens for speculative decoding: a `draft` model or `prompt_lookup` n-grams."""

    draft: GPT | None = None
    """A smaller model with the target's tokenizer (the same vocabulary) that proposes the tokens."""
    prompt_lookup: int = 0
    """Without a draft model: match the sequence's last n-gram (n = this, down to 1) earlier in the
    prompt and generated text, and propose the tokens that followed it; 0 disables."""
    num_tokens: int = 4
    """Tokens drafted per step (K); the target verifies K + 1 positions per row in one forward."""

    def validate(self, model: GPT | None = None) -> Speculation:
        """Raise ValueError naming what is wrong (against target `model` when given); returns self."""
        if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) or self.num_tokens < 1:
            raise ValueError(f"Speculation.num_tokens must be an integer >= 1, got {self.num_tokens!r}")
        lookup = self.prompt_lookup
        if not isinstance(lookup, int) or isinstance(lookup, bool) or lookup < 0:
            raise ValueError(f"Speculation.prompt_lookup must be an integer >= 0 (0 disables), got {lookup!r}")
        if (self.draft is None) == (lookup == 0):
            raise ValueError("speculative decoding needs exactly one drafter: a draft model or prompt_lookup > 0")
        if self.draft is not None and model is not None:
            if self.draft is model:
                raise ValueError("the draft model is the target itself; use a smaller model or prompt_lookup")
            ours, theirs = self.draft.config.vocab_size, model.config.vocab_size
            if ours != theirs:
                raise ValueError(
                    f"the draft model's vocabulary has {ours} tokens and the target's {theirs}: "
                    "a draft model must share the target's tokenizer"
                )
        return self


def acceptance(p: Tensor, q: Tensor) -> Tensor:
    """Probability of keeping a draft token that the target gives probability p and the drafter q."""
    return (p / q).clamp(max=1.0)


def next_draft_length(current: int, kept_all: bool, most: int) -> int:
    """Prompt lookup's next draft length, as transformers' heuristic schedule sets its assistant's: 2
    more (up to `most`, K) after a draft the target kept whole, 1 fewer (down to 1) after one it cut.
    A lookup draft is either the text the target is copying or a guess it rejects at once; drafting
    fewer after a miss saves verifying positions (each costs ~0.1-0.2 of a step at 5+ positions)."""
    return min(current + 2, most) if kept_all else max(current - 1, 1)


def lookup(tokens: Sequence[int], n: int, k: int) -> list[int]:
    """Up to `k` tokens that followed the first earlier occurrence of `tokens`' last m-gram, trying
    m = n down to 1 (transformers' prompt lookup); [] when none occurs."""
    if k < 1 or len(tokens) < 2:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    # Earlier m-grams equal to the last one end where the last token occurs before: narrow those ends
    # by the tokens before them, rather than comparing every window (this runs once per step).
    ends = np.flatnonzero(seq[:-1] == seq[-1])
    for m in range(min(n, len(seq) - 1), 0, -1):
        hits = ends[ends >= m - 1]
        for j in range(1, m):
            hits = hits[seq[hits - j] == seq[-1 - j]]
        if len(hits):
            start = int(hits[0]) + 1
            return seq[start : start + k].tolist()
    return []


class Speculator:
    """Speculative steps for the rows of `engine`: drafting, one verification forward, acceptance, and
    the draft model's own engine and sequences (`close` gives them back)."""

    def __init__(
        self,
        engine: InferenceEngine,
        speculation: Speculation,
        rows: Sequence[Row] = (),
        cache_tokens: int | None = None,
    ) -> None:
        """The draft model's KV pool holds `cache_tokens` (default: enough for `rows`)."""
        self.engine, self.spec = engine, speculation.validate(engine.model)
        self.draft_engine: InferenceEngine | None = None
        self.drafts: dict[Row, CacheSequence] = {}
        self.lookup_tokens: dict[Row, int] = {}  # each row's current prompt-lookup draft length
        if speculation.draft is not None:
            if cache_tokens is None:  # every row's prompt and tokens, plus what copy-on-write and truncation take
                cache_tokens = sum(len(r.prompt) + r.params.max_new_tokens + 3 * BLOCK_SIZE for r in rows)
            tokens = max(cache_tokens, speculation.draft.config.n_ctx + 3 * BLOCK_SIZE)
            self.draft_engine = InferenceEngine(speculation.draft, kv_cache_tokens=tokens)

    def summary(self) -> dict[str, object]:
        """The drafter, K, and the engine's acceptance counters (the server's /health)."""
        drafter = f"prompt lookup (n <= {self.spec.prompt_lookup})" if self.spec.prompt_lookup else "draft model"
        return {"drafter": drafter, "num_tokens": self.spec.num_tokens, **self.engine.speculation.summary()}

    def release(self, row: Row) -> None:
        """Give back the draft sequence of a row that finished."""
        self.lookup_tokens.pop(row, None)
        seq = self.drafts.pop(row, None)
        if seq is not None and self.draft_engine is not None:
            self.draft_engine.free(seq)

    def close(self) -> None:
        for row in list(self.drafts):
            self.release(row)
        self.lookup_tokens.clear()

    # ---- one step ----------------------------------------------------------------------------
    def step(self, rows: Sequence[Row], eos_id: int | None) -> None:
        """Advance every row (live, its last token appended and not yet computed) by 1 to K + 1 tokens."""
        n_ctx = self.engine.model.config.n_ctx
        # a step records up to K + 1 tokens: one fewer drafts than the row may still take
        budget = [
            min(self._most(r) + 1, r.params.max_new_tokens - len(r.ids), n_ctx - len(r.seq.tokens)) - 1 for r in rows
        ]
        drafts, q_logits, masks = self._draft(rows, [max(b, 0) for b in budget], eos_id)
        base = [len(r.seq.tokens) for r in rows]
        for r, d in zip(rows, drafts, strict=True):
            r.seq.tokens.extend(d)
        logits = self.engine.forward([r.seq for r in rows], [len(d) + 1 for d in drafts])  # (sum(K_b + 1), V)
        allowed = [m for r, d, row_masks in zip(rows, drafts, masks, strict=True)
                   for m in (row_masks if row_masks is not None else [None] * (len(d) + 1))]  # fmt: skip
        p_logits = self._process(apply_masks(logits, allowed), rows, drafts)
        greedy, broken_at = best_tokens(p_logits)
        probs = None
        if not all(r.params.greedy for r in rows):
            if any(broken_at):
                p_logits = p_logits.masked_fill(torch.tensor(broken_at)[:, None], 0.0)
            probs = p_logits.softmax(-1)
        stats = self.engine.speculation
        offset, chosen = 0, []
        for b, (row, d) in enumerate(zip(rows, drafts, strict=True)):
            positions = range(offset, offset + len(d) + 1)
            tokens, failed = self._accept(row, d, q_logits[b], positions, probs, greedy, broken_at)
            chosen.append((tokens, failed, positions))
            stats.steps += 1
            stats.drafted += len(d)
            stats.accepted += len(tokens) - (not failed)
            offset += len(d) + 1
            if self.spec.prompt_lookup and d:
                kept_all = len(tokens) - (not failed) == len(d)
                self.lookup_tokens[row] = next_draft_length(self._most(row), kept_all, self.spec.num_tokens)
        want = [r.params.logprobs for r in rows if r.params.logprobs is not None]
        lps: list[tuple | None] = [None] * len(rows)
        if want:
            for b, (row, (tokens, _, positions)) in enumerate(zip(rows, chosen, strict=True)):
                if row.params.logprobs is not None and tokens:
                    at = logits[positions.start : positions.start + len(tokens)]
                    chosen_ids = torch.tensor(tokens, device=at.device)
                    lp, top_v, top_i = (t.tolist() for t in top_logprobs(at, chosen_ids, max(want)))
                    lps[b] = [(lp[j], top_v[j], top_i[j]) for j in range(len(tokens))]
        for b, (row, (tokens, failed, _)) in enumerate(zip(rows, chosen, strict=True)):
            kept = len(tokens) - (not failed)  # draft tokens accepted: their keys and values stay cached
            self.engine.truncate(row.seq, base[b] + kept)
            if row.matcher is not None:  # the grammar walked the whole draft; `record` walks what is kept
                row.matcher.rollback(sum(t != eos_id for t in drafts[b]))
            try:
                for j, token in enumerate(tokens):
                    record(row, token, eos_id, n_ctx, lps[b][j] if lps[b] else None)
                    stats.tokens += 1
                    if row.done:
                        break
                else:
                    if failed:
                        row.fail(NOT_FINITE)
                    else:
                        row.seq.tokens.append(tokens[-1])
            except Exception as e:  # one row's bookkeeping (a tokenizer error, say) ends that row alone
                log.exception("row bookkeeping failed")
                row.fail(f"{type(e).__name__}: {e}")

    def _most(self, row: Row) -> int:
        """Tokens the row may draft this step: K, or for prompt lookup its current length."""
        return self.lookup_tokens.get(row, self.spec.num_tokens) if self.spec.prompt_lookup else self.spec.num_tokens

    def _accept(
        self,
        row: Row,
        draft: list[int],
        q_logits: Tensor | None,
        positions: range,
        probs: Tensor | None,
        greedy: list[int],
        broken: list[bool],
    ) -> tuple[list[int], bool]:
        """The tokens a row keeps: accepted draft tokens then the target's own (corrected or bonus), or
        (failed) the accepted ones up to a position whose logits cannot be sampled."""
        out: list[int] = []
        g = row.generator
        for j, at in enumerate(positions):
            if broken[at]:
                return out, True
            if row.params.greedy:
                if j < len(draft) and draft[j] == greedy[at]:
                    out.append(draft[j])
                    continue
                out.append(greedy[at])
                return out, False
            assert probs is not None
            p = probs[at]
            if j == len(draft):  # every draft token accepted: a bonus token from the target
                out.append(int(torch.multinomial(p, 1, generator=g)))
                return out, False
            x = draft[j]
            q = q_logits[j].softmax(-1) if q_logits is not None else None
            u = torch.rand((), generator=g, device=p.device)
            if u < acceptance(p[x], q[x] if q is not None else p.new_ones(())):
                out.append(x)
                continue
            if q is not None:
                residual = (p - q).clamp(min=0)
            else:  # q one-hot at x: p without x
                residual = p.clone()
                residual[x] = 0
            if not residual.sum() > 0:  # p == q up to rounding: any draw from p is exact
                residual = p
            out.append(int(torch.multinomial(residual, 1, generator=g)))
            return out, False
        raise AssertionError("unreachable: the last position always decides")

    def _process(self, logits: Tensor, rows: Sequence[Row], drafts: list[list[int]]) -> Tensor:
        """Processed logits of every verified position: penalties see the draft tokens before it."""
        params = [r.params for r, d in zip(rows, drafts, strict=True) for _ in range(len(d) + 1)]
        history = any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params)
        generated = (
            [r.ids + d[:j] for r, d in zip(rows, drafts, strict=True) for j in range(len(d) + 1)]
            if history
            else [[]] * len(params)
        )
        prompts = None
        if any(p.repetition_penalty != 1 for p in params):
            prompts = [r.prompt for r, d in zip(rows, drafts, strict=True) for _ in range(len(d) + 1)]
        return process_logits(logits, generated, params, prompts)

    # ---- drafting ----------------------------------------------------------------------------
    def _draft(
        self, rows: Sequence[Row], budget: list[int], eos_id: int | None
    ) -> tuple[list[list[int]], list[Tensor | None], list[list[np.ndarray] | None]]:
        """Draft tokens per row (at most its budget); from a draft model their processed logits (K_b, V)
        (None: prompt lookup, a deterministic draft); and for a constrained row the grammar's masks at its
        K_b + 1 verified positions (the row's matcher is left past the draft: `step` rolls it back).
        A draft ends at end-of-text, and a constrained row drafts only what its grammar accepts."""
        V = self.engine.model.config.vocab_size
        masks: list[list[np.ndarray] | None] = [[] if r.matcher is not None else None for r in rows]
        if self.spec.prompt_lookup:
            drafts = [lookup(r.seq.tokens, self.spec.prompt_lookup, k) for r, k in zip(rows, budget, strict=True)]
            for b, (row, d) in enumerate(zip(rows, drafts, strict=True)):
                if eos_id in d:
                    del d[d.index(eos_id) + 1 :]
                if row.matcher is not None:
                    del d[row.matcher.accepted_prefix([t for t in d if t != eos_id]) :]
                    for t in d:
                        masks[b].append(row.matcher.allowed(V))
                        if t != eos_id:
                            row.matcher.consume(t)
            return drafts, [None] * len(rows), self._last_masks(rows, masks, V)
        assert self.draft_engine is not None
        draft_ctx = self.draft_engine.model.config.n_ctx
        budget = [min(k, draft_ctx - len(r.seq.tokens) + 1) for r, k in zip(rows, budget, strict=True)]
        drafts: list[list[int]] = [[] for _ in rows]
        q: list[list[Tensor]] = [[] for _ in rows]
        active = [b for b, k in enumerate(budget) if k > 0]
        seqs = {b: self._synced(rows[b]) for b in active}
        while active:
            chosen_rows = [rows[b] for b in active]
            step_masks = [r.matcher.allowed(V) if r.matcher is not None else None for r in chosen_rows]
            logits = apply_masks(self.draft_engine.forward([seqs[b] for b in active]), step_masks)
            params = [r.params for r in chosen_rows]
            prompts = [r.prompt for r in chosen_rows] if any(p.repetition_penalty != 1 for p in params) else None
            processed = process_logits(logits, [rows[b].ids + drafts[b] for b in active], params, prompts)
            tokens, broken = sample_checked(processed, params, [r.generator for r in chosen_rows])
            still = []
            for i, b in enumerate(active):
                if broken[i]:  # a draft that cannot be sampled proposes nothing more
                    continue
                drafts[b].append(tokens[i])
                if not rows[b].params.greedy:  # greedy acceptance compares argmaxes, not distributions
                    q[b].append(processed[i])
                if step_masks[i] is not None:
                    masks[b].append(step_masks[i])
                    if tokens[i] != eos_id:
                        rows[b].matcher.consume(tokens[i])
                if len(drafts[b]) < budget[b] and tokens[i] != eos_id:
                    seqs[b].tokens.append(tokens[i])
                    still.append(b)
            active = still
            picked = [rows[b] for b in active], [seqs[b] for b in active], [drafts[b] for b in active]
            if active and self._finish_greedy(*picked, [budget[b] for b in active], eos_id):
                break
        return drafts, [torch.stack(x) if x else None for x in q], self._last_masks(rows, masks, V)

    def _finish_greedy(
        self, rows: list[Row], seqs: list[CacheSequence], drafts: list[list[int]], budget: list[int], eos_id: int | None
    ) -> bool:
        """Draft the rest of each row's budget at once where every row takes the draft model's plain
        argmax: one C call feeding argmaxes back (`InferenceEngine.greedy`), not a Python step a token.
        False, with nothing done, where that does not apply."""
        if not all(r.params.plain_argmax and r.matcher is None for r in rows):
            return False
        assert self.draft_engine is not None
        try:  # rows that may draft fewer compute the longest one's steps too: their pool may be short
            got = self.draft_engine.greedy(seqs, max(k - len(d) for d, k in zip(drafts, budget, strict=True)))
        except OutOfBlocks:  # nothing computed yet: the step-by-step loop goes on, within each budget
            got = None
        if got is None:
            return False
        for draft, most, tokens in zip(drafts, budget, got, strict=True):
            for token in tokens[: most - len(draft)]:
                if token < 0:  # cannot be sampled: the draft ends before it
                    break
                draft.append(token)
                if token == eos_id:
                    break
        return True

    @staticmethod
    def _last_masks(rows: Sequence[Row], masks: list[list[np.ndarray] | None], vocab: int) -> list:
        """Each constrained row's masks completed with the one after its whole draft."""
        for row, m in zip(rows, masks, strict=True):
            if m is not None:
                m.append(row.matcher.allowed(vocab))
        return masks

    def _synced(self, row: Row) -> CacheSequence:
        """The row's draft sequence holding the row's tokens, its cache kept as far as they agree."""
        assert self.draft_engine is not None
        target = row.seq.tokens
        seq = self.drafts.get(row)
        if seq is None:
            seq = self.drafts[row] = self.draft_engine.sequence(target)
            return seq
        agree = min(len(seq.tokens), len(target))
        same = next((i for i, (a, b) in enumerate(zip(seq.tokens, target)) if a != b), agree)
        self.draft_engine.truncate(seq, min(same, len(target) - 1))  # at least one token left to compute
        seq.tokens.extend(target[len(seq.tokens) :])
        return seq
