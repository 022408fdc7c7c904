"""Continuous batching: one loop decodes every active sequence in one batched step.

The KV cache is slot based: one preallocated tensor (n_layer, slots, nh, n_ctx, hs) for keys and one
for values, a slot per sequence, each sequence at its own length. A decode step writes each row's new
key/value at that row's own position and masks every row's attention to its own filled slots, so rows
of any lengths share one step and nothing is ever re-padded. Active sequences always occupy slots
[0, B): when one finishes, the last active row is moved into its slot (one row copied), so attention
reads a plain view of the cache, never a gather.

Between two decode steps the loop (a background thread; torch releases the GIL in its kernels):
drops rows whose client went away, admits queued prompts while slots are free (a B=1 prefill each,
its cache copied into `n` slots for `n` samples), samples the next token of every row with that row's
own `SamplingParams` (the same `process_logits` / `sample_next` as `gptlab.generate`, so a request
gives the same tokens here as there), retires finished rows, and runs one batched decode step.

An exception while serving one request fails that request only; one in the shared step fails the
requests in that step, and the loop carries on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from gptlab.generate import Completion, TokenLogprob, _TextTracker
from gptlab.model import GPT, KVCache, kv_cache_dtype, to_cache
from gptlab.sampling import SamplingParams, make_generator, process_logits, sample_next, top_logprobs
from gptlab.serve.jobs import Delta, Finished, Job, PromptLogprobs, QueueFull, deliver

log = logging.getLogger("gptlab.serve")


@dataclass
class _Group:
    """One prompt of a job, to be sampled `params.n` times."""

    job: Job
    prompt: list[int]
    prompt_index: int
    params: SamplingParams
    stops: list[str]
    prompt_logprobs: int | None


@dataclass(eq=False)
class _Seq:
    group: _Group
    sample: int
    slot: int
    length: int
    """Tokens in this row's cache slot."""
    tracker: _TextTracker
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    sent_logprobs: int = 0
    finish_reason: str | None = None

    @property
    def params(self) -> SamplingParams:
        return self.group.params

    @property
    def index(self) -> int:
        return self.group.prompt_index * self.group.params.n + self.sample

    @property
    def gone(self) -> bool:
        job = self.group.job
        return self.finish_reason is not None or job.cancelled or job.failed


class Engine:
    """Serves many generation requests on one model with continuous batching.

    `max_concurrent` sequences decode together (a request with n samples uses n); up to `max_queue`
    requests wait beyond that, and `submit` raises QueueFull past it.
    """

    def __init__(self, model: GPT, tokenizer, max_concurrent: int = 16, max_queue: int = 256) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        c = model.config
        weight = model.transformer.wte.weight
        self.max_len = c.n_ctx
        shape = (c.n_layer, max_concurrent, c.n_head, c.n_ctx, c.head_size)
        dtype = kv_cache_dtype(model, max_concurrent, split=True)
        self.k = torch.zeros(shape, device=weight.device, dtype=dtype)
        self.v = torch.zeros(shape, device=weight.device, dtype=dtype)
        self._rows: list[_Seq] = []  # row i lives in cache slot i
        self._logits: Tensor | None = None  # (len(rows), V) next-token logits awaiting sampling
        self._pending: deque[_Group] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._outbox: list[tuple[Job, object]] = []  # events of this step, delivered together
        self.counters = dict(steps=0, max_batch=0, completed=0, cancelled=0, failed=0, tokens=0)

    # ---- public ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="gptlab-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for seq in self._rows:
            seq.group.job._fail("the server is shutting down")
        for group in self._pending:
            group.job._fail("the server is shutting down")
        self._flush()
        self._rows, self._pending, self._logits = [], deque(), None

    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        stops: Sequence[str] = (),
        prompt_logprobs: int | None = None,
        deltas: bool = True,
    ) -> Job:
        """Queue `prompts` (token ids) for `params.n` completions each; call from the event loop.
        `prompt_logprobs`: also report the prompt tokens' logprobs with this many alternatives."""
        params.validate()
        if params.n > self.max_concurrent:
            raise ValueError(
                f"n={params.n} exceeds the {self.max_concurrent} concurrent sequences of this server"
            )
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; start it with the end-of-text token")
            if len(p) + params.max_new_tokens > self.max_len:
                raise ValueError(
                    f"prompt {i} of {len(p)} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
                    f"context of {self.max_len}"
                )
        job = Job(self, len(prompts) * params.n, asyncio.get_running_loop(), deltas)
        groups = [
            _Group(job, list(p), i, params, list(stops), prompt_logprobs) for i, p in enumerate(prompts)
        ]
        with self._cond:
            if len({id(g.job) for g in self._pending}) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._pending.extend(groups)
            self._cond.notify_all()
        return job

    def stats(self) -> dict[str, int]:
        with self._cond:
            waiting = len({id(g.job) for g in self._pending})
        return dict(active=len(self._rows), waiting=waiting, slots=self.max_concurrent, **self.counters)

    # ---- the loop ----------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._rows and not self._pending:
                        self._cond.wait()
                    if self._stopping:
                        return
                    admitted = self._take()
                try:
                    self._iteration(admitted)
                except Exception as e:  # a fault in the shared step: fail the requests in it, keep serving
                    log.exception("engine step failed")
                    for seq in self._rows:
                        seq.group.job._fail(f"generation failed: {type(e).__name__}: {e}")
                    self.counters["failed"] += len({id(s.group.job) for s in self._rows})
                    self._rows, self._logits = [], None
                self._flush()

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop, not one per token."""
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, object]]] = {}
        for job, event in outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for job, _ in items:
                    job.cancelled = True

    def _take(self) -> list[_Group]:
        """Queued groups that fit the free slots, first come first served (caller holds the lock)."""
        free = self.max_concurrent - len(self._rows)
        taken = []
        while self._pending:
            group = self._pending[0]
            job = group.job
            if job.cancelled or job.failed:
                self._pending.popleft()
                continue
            need = group.params.n if group.params.max_new_tokens else 0
            if need > free:
                break
            taken.append(self._pending.popleft())
            free -= need
        return taken

    def _iteration(self, admitted: list[_Group]) -> None:
        if any(seq.gone for seq in self._rows):
            self._count_cancelled()
            self._logits = self._compact(self._logits)
        for group in admitted:
            if group.job.cancelled or group.job.failed:
                continue
            try:
                self._prefill(group)
            except Exception as e:
                log.exception("prefill failed")
                self.counters["failed"] += 1
                group.job._fail(f"generation failed: {type(e).__name__}: {e}")
        if not self._rows:
            return
        assert self._logits is not None
        chosen = self._sample_and_advance()
        chosen = self._compact(chosen)
        self._flush()  # clients see this step's tokens before the next decode step runs
        self._logits = self._decode(chosen) if self._rows else None

    def _count_cancelled(self) -> None:
        jobs = {id(s.group.job): s.group.job for s in self._rows if s.group.job.cancelled}
        self.counters["cancelled"] += len(jobs)

    # ---- prefill -----------------------------------------------------------------------------
    def _prefill(self, group: _Group) -> None:
        T, n, params = len(group.prompt), group.params.n, group.params
        weight = self.k
        cache = KVCache(self.model.config, 1, T, device=weight.device, dtype=weight.dtype)
        idx = torch.tensor([group.prompt], dtype=torch.long, device=weight.device)
        want_prompt = group.prompt_logprobs is not None
        logits, _ = self.model(idx, cache=cache, last_only=not want_prompt)  # (1, T or 1, V)
        if want_prompt:
            group.job._emit(PromptLogprobs(group.prompt_index, self._prompt_logprobs(group, logits[0])))
        if params.max_new_tokens == 0:
            for j in range(n):
                done = Completion(
                    "", [], "length", [] if params.logprobs is not None else None, group.prompt_index
                )
                group.job._emit(Finished(group.prompt_index * n + j, done, 0))
            return
        start = len(self._rows)
        self.k[:, start : start + n, :, :T] = cache.k  # (n_layer, 1 -> n, nh, T, hs)
        self.v[:, start : start + n, :, :T] = cache.v
        for j in range(n):
            self._rows.append(
                _Seq(
                    group,
                    j,
                    start + j,
                    T,
                    _TextTracker(self.tokenizer, group.stops),
                    make_generator(params.seed, j, weight.device),
                    logprobs=[] if params.logprobs is not None else None,
                )
            )
        last = logits[:, -1].float().expand(n, -1)
        self._logits = last if self._logits is None else torch.cat([self._logits, last])

    def _prompt_logprobs(self, group: _Group, logits: Tensor) -> list[TokenLogprob | None]:
        k = group.prompt_logprobs or 0
        prompt = torch.tensor(group.prompt[1:], device=logits.device)
        lp, top_v, top_i = (t.tolist() for t in top_logprobs(logits[:-1], prompt, k))
        out: list[TokenLogprob | None] = [None]
        decode = self.tokenizer.decode
        for t, token in enumerate(group.prompt[1:]):
            top = [(decode([i]), v) for i, v in zip(top_i[t], top_v[t], strict=True)]
            out.append(TokenLogprob(decode([token]), token, lp[t], top))
        return out

    # ---- sampling and bookkeeping ------------------------------------------------------------
    def _sample_and_advance(self) -> Tensor:
        """Choose every row's next token, record it, send its text; returns the tokens (B,)."""
        rows, logits = self._rows, self._logits
        assert logits is not None
        params = [s.params for s in rows]
        prompts = [s.group.prompt for s in rows] if any(p.repetition_penalty != 1 for p in params) else None
        processed = process_logits(logits, [s.ids for s in rows], params, prompts)
        generators = [s.generator for s in rows]
        chosen = sample_next(
            processed, params, generators if any(g is not None for g in generators) else None
        )
        want = [p.logprobs for p in params if p.logprobs is not None]
        if want:
            lp, top_v, top_i = (t.tolist() for t in top_logprobs(logits, chosen, max(want)))
        self.counters["steps"] += 1
        self.counters["max_batch"] = max(self.counters["max_batch"], len(rows))
        eot = self.tokenizer.eot_id
        for b, (seq, token) in enumerate(zip(rows, chosen.tolist(), strict=True)):
            try:
                if token == eot:
                    seq.finish_reason = "stop"
                else:
                    seq.ids.append(token)
                    self.counters["tokens"] += 1
                    if seq.logprobs is not None:
                        k = seq.params.logprobs or 0
                        decode = self.tokenizer.decode
                        top = [(decode([i]), v) for i, v in zip(top_i[b][:k], top_v[b][:k], strict=True)]
                        seq.logprobs.append(TokenLogprob(decode([token]), token, lp[b], top))
                    if seq.tracker.push(token):
                        seq.finish_reason = "stop"
                    elif len(seq.ids) >= seq.params.max_new_tokens or seq.length >= self.max_len:
                        seq.finish_reason = "length"
                self._send(seq)
            except Exception as e:
                log.exception("request bookkeeping failed")
                self.counters["failed"] += 1
                seq.group.job._fail(f"generation failed: {type(e).__name__}: {e}")
        return chosen

    def _send(self, seq: _Seq) -> None:
        job, tracker = seq.group.job, seq.tracker
        if seq.finish_reason is None:
            text = tracker.delta() if job.deltas else ""
            if text:
                new = seq.logprobs[seq.sent_logprobs :] if seq.logprobs is not None else []
                seq.sent_logprobs += len(new)
                job._emit(Delta(seq.index, text, new))
            return
        tracker.finish()
        keep = tracker.kept_tokens()
        text = tracker.delta(final=True)
        new = seq.logprobs[seq.sent_logprobs : keep] if seq.logprobs is not None else []
        if (text or new) and job.deltas:
            job._emit(Delta(seq.index, text, new))
        logprobs = None if seq.logprobs is None else seq.logprobs[:keep]
        done = Completion(tracker.text, seq.ids[:keep], seq.finish_reason, logprobs, seq.group.prompt_index)
        job._emit(Finished(seq.index, done, len(seq.ids)))
        self.counters["completed"] += 1

    def _compact(self, per_row: Tensor | None) -> Tensor | None:
        """Retire finished / cancelled rows; survivors move down so active rows fill slots [0, B).
        Returns `per_row` (indexed by old slot) reordered to the new rows."""
        rows = self._rows
        keep = [s for s in rows if not s.gone]
        if len(keep) == len(rows):
            return per_row
        m = len(keep)
        old_slot = {id(s): s.slot for s in keep}
        holes = [s.slot for s in rows[:m] if s.gone]
        movers = [s for s in rows[m:] if not s.gone]
        for hole, seq in zip(holes, movers, strict=True):
            n = seq.length
            self.k[:, hole, :, :n] = self.k[:, seq.slot, :, :n]
            self.v[:, hole, :, :n] = self.v[:, seq.slot, :, :n]
            seq.slot = hole
        keep.sort(key=lambda s: s.slot)
        self._rows = keep
        if per_row is None or not keep:
            return None
        index = torch.tensor([old_slot[id(s)] for s in keep], device=per_row.device)
        return per_row.index_select(0, index)

    # ---- the batched decode step -------------------------------------------------------------
    def _decode(self, tokens: Tensor) -> Tensor:
        """Feed each active row its token at the row's own position; next-token logits (B, V) float32.

        Same maths as `GPT.forward` with a cache, with per-row positions and masks.
        """
        model, rows = self.model, self._rows
        t, config = model.transformer, model.config
        B, C, nh = len(rows), config.n_embd, config.n_head
        hs = C // nh
        device = self.k.device
        pos = torch.tensor([s.length for s in rows], device=device)  # (B,) where each new token goes
        fused = getattr(model, "cpu_decode_step", None)  # gptlab's CPU kernels: the step in C
        if fused is not None and fused.accepts(B, self.k, split=True):
            logits = fused(tokens, pos, pos, self.k, self.v, None)
            for seq in rows:
                seq.length += 1
            return logits
        end = int(pos.max()) + 1
        x = t.wte(tokens.view(B, 1).to(device)) + t.wpe(pos.view(B, 1))  # (B, 1, C)
        s = torch.arange(end, device=device)
        dense = (s[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, end): each row its own length
        local = dense & ((pos[:, None] - s[None, :]) < config.local_window)[:, None, None, :]
        batch = torch.arange(B, device=device)
        for layer, block in enumerate(t.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)
            q = q.view(B, 1, nh, hs).transpose(1, 2)  # (B, nh, 1, hs)
            self.k[layer][batch, :, pos] = to_cache(k.reshape(B, nh, hs), self.k)
            self.v[layer][batch, :, pos] = to_cache(v.reshape(B, nh, hs), self.v)
            keys, values = self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]  # (B, nh, end, hs)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=local if attn.local else dense)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, 1, C))
            x = x + block.mlp(block.ln_2(x))
        for seq in rows:
            seq.length += 1
        return model.logits(t.ln_f(x))[:, -1].float()
