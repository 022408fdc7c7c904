"""Continuous batching: the scheduler between HTTP requests and the inference engine.

It only schedules: admission, the queue, preemption, cancellation and streaming. The maths (the KV
pool, prefill, the decoding step, choosing tokens) is `gptlab.infer`'s, the same code `generate`
runs, so a request gives the same tokens here as there.

Between two decoding steps the loop (a background thread; torch releases the GIL in its kernels):
drops rows whose client went away; admits preempted rows, then queued prompts, while the KV pool
has free blocks for them (a prompt starting with cached blocks shares them); samples the next token
of every row with that row's own `SamplingParams`; retires finished rows (their blocks go back, full
ones stay cached for prefix hits); makes sure every row has a block for its next token, preempting
the most recently admitted rows when the pool runs out (their blocks are freed and their tokens
recomputed when they resume, usually from the prefix cache); then runs one batched decoding step.
With speculative decoding (`speculation`) that step drafts and verifies up to K + 1 tokens a row
(`gptlab.infer.speculative`, the code `generate` runs), and rows just admitted sample their first
token from their prefill's logits.

A fault in one row (a non-finite sample, a tokenizer error) ends that row's request alone; one in the
shared step fails the requests in that step, and the loop carries on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from gptlab.infer.cache import BLOCK_SIZE, OutOfBlocks
from gptlab.infer.engine import InferenceEngine, default_cache_tokens
from gptlab.infer.rows import Completion, Row, TokenLogprob, advance, make_rows, start
from gptlab.infer.sampling import SamplingParams, top_logprobs
from gptlab.infer.speculative import Speculation, Speculator
from gptlab.model import GPT
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
class _Entry:
    """A row the server is generating, with the job it answers."""

    row: Row
    group: _Group
    sent_logprobs: int = 0
    last_token: float | None = None
    """time.monotonic() of the row's latest token (None before its first)."""

    @property
    def gone(self) -> bool:
        job = self.group.job
        return self.row.done or job.cancelled or job.failed


class Observer(Protocol):
    """What the engine reports as tokens are sampled (`gptlab.serve.metrics.Metrics`), in seconds."""

    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...
    def finished(self, seconds: float, prompt_tokens: int) -> None: ...


class Engine:
    """Serves many generation requests on one model with continuous batching over a paged KV cache.

    At most `max_concurrent` sequences decode together (a request with n samples uses n), as many as
    the KV pool of `kv_cache_tokens` tokens holds (default: what fits a quarter of the free memory,
    at most max_concurrent full contexts); up to `max_queue` requests wait beyond that, and `submit`
    raises QueueFull past it. `speculation`: decode with speculative decoding (a draft model or prompt
    lookup); the draft model gets a KV pool of its own, as many tokens as the target's.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer,
        max_concurrent: int = 16,
        max_queue: int = 256,
        *,
        kv_cache_tokens: int | None = None,
        prefix_caching: bool = True,
        block_size: int = BLOCK_SIZE,
        speculation: Speculation | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.max_len = model.config.n_ctx
        if kv_cache_tokens is None:
            kv_cache_tokens = default_cache_tokens(model, torch.float32, most=max_concurrent * self.max_len)
        self.core = InferenceEngine(
            model, kv_cache_tokens=kv_cache_tokens, prefix_caching=prefix_caching, block_size=block_size
        )
        self.pool = self.core.pool
        self.speculator: Speculator | None = None
        self._new_tokens = 1  # positions a row may compute in one step
        if speculation is not None:
            margin = max_concurrent * (speculation.num_tokens + 3 * block_size)
            self.speculator = Speculator(self.core, speculation, cache_tokens=kv_cache_tokens + margin)
            self._new_tokens = speculation.num_tokens + 1
        self._running: list[_Entry] = []
        self._logits: Tensor | None = None  # (len(running), V) next-token logits awaiting sampling
        self._pending: deque[_Group] = deque()
        self._resume: deque[_Entry] = deque()  # preempted rows, first to be admitted again
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._outbox: list[tuple[Job, object]] = []  # events of this step, delivered together
        self.counters = dict(steps=0, max_batch=0, completed=0, cancelled=0, failed=0, tokens=0)
        self.observer: Observer | None = None

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
        for entry in (*self._running, *self._resume):
            entry.group.job.fail("the server is shutting down")
            if entry.row.seq is not None:
                self.core.free(entry.row.seq)
        for group in self._pending:
            group.job.fail("the server is shutting down")
        self._flush()
        self._running, self._pending, self._resume, self._logits = [], deque(), deque(), None

    def wake(self) -> None:
        """Run the loop now (a job was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    def post(self, job: Job, event: object) -> None:
        """Queue an event for `job`; the loop delivers each step's events together."""
        self._outbox.append((job, event))

    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        stops: Sequence[str] = (),
        prompt_logprobs: int | None = None,
        deltas: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Job:
        """Queue `prompts` (token ids) for `params.n` completions each; call from the event loop (or
        name the `loop` that receives the job's events).
        `prompt_logprobs`: also report the prompt tokens' logprobs with this many alternatives."""
        params.validate()
        if params.n > self.max_concurrent:
            raise ValueError(f"n={params.n} exceeds the {self.max_concurrent} concurrent sequences of this server")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; start it with the end-of-text token")
            if len(p) + params.max_new_tokens > self.max_len:
                raise ValueError(
                    f"prompt {i} of {len(p)} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
                    f"context of {self.max_len}"
                )
            need = self._blocks_needed(len(p), params.n, params.max_new_tokens)
            if need > self.pool.num_blocks:
                raise ValueError(
                    f"prompt {i} of {len(p)} tokens with n={params.n} x max_new_tokens={params.max_new_tokens} "
                    f"needs {need * self.pool.block_size} KV-cache tokens; this server holds "
                    f"{self.pool.capacity} (--kv-cache-tokens)"
                )
        job = Job(self, len(prompts) * params.n, loop or asyncio.get_running_loop(), deltas)
        groups = [_Group(job, list(p), i, params, list(stops), prompt_logprobs) for i, p in enumerate(prompts)]
        with self._cond:
            if len({id(g.job) for g in self._pending}) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._pending.extend(groups)
            self._cond.notify_all()
        return job

    def stats(self) -> dict[str, object]:
        with self._cond:
            waiting = len({id(g.job) for g in self._pending}) + len({id(e.group.job) for e in self._resume})
        out: dict[str, object] = dict(
            active=len(self._running),
            waiting=waiting,
            slots=self.max_concurrent,
            **self.counters,
            kv_cache=self.core.summary(),
        )
        if self.speculator is not None:
            out["speculative"] = self.speculator.summary()
        return out

    # ---- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._running and not self._pending and not self._resume:
                        self._cond.wait()
                    if self._stopping:
                        return
                try:
                    self._iteration()
                except Exception as e:  # a fault in the shared step: fail the requests in it, keep serving
                    log.exception("engine step failed")
                    self._fail_running(f"generation failed: {type(e).__name__}: {e}")
                self._flush()

    def _fail_running(self, message: str) -> None:
        jobs = {id(e.group.job): e.group.job for e in self._running}
        for job in jobs.values():
            job.fail(message)
        self.counters["failed"] += len(jobs)
        for entry in self._running:
            self._release(entry)
        self._running, self._logits = [], None

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

    def _iteration(self) -> None:
        self._retire()
        self._admit()
        if not self._running:
            return
        if self.speculator is not None:
            self._speculative_iteration(self.speculator)
            return
        assert self._logits is not None
        self._sample()
        self._retire()
        self._flush()  # clients see this step's tokens before the next decoding step runs
        if self._running:
            self._make_room()
        self._logits = self._decode() if self._running else None

    def _speculative_iteration(self, speculator: Speculator) -> None:
        """Rows admitted this iteration (the last ones, holding prefill logits) sample their first
        token; the others take a speculative step of 1 to K + 1 tokens."""
        fresh = len(self._logits) if self._logits is not None else 0
        entries = list(self._running)
        stepping = entries[: len(entries) - fresh]
        before = sum(len(e.row.ids) for e in entries)
        if fresh:
            advance([e.row for e in self._running[-fresh:]], self._logits, self.tokenizer.eot_id, self.max_len)
            for entry in self._running[-fresh:]:
                self._send(entry)
        self._logits = None
        self._retire()  # before preemption: a finished row must not wait in the resume queue
        live = [e for e in stepping if not e.gone]
        if live:
            self._make_room(keep=len(live))
            still = set(self._running)
            live = [e for e in live if e in still]
        if live:
            speculator.step([e.row for e in live], self.tokenizer.eot_id)
        self._count_step(sum(len(e.row.ids) for e in entries) - before, len(live) + fresh)
        for entry in live:
            self._send(entry)
        self._retire()

    # ---- admission ---------------------------------------------------------------------------
    def _blocks_needed(self, prompt: int, n: int, new: int = 1) -> int:
        """Blocks a group needs for `new` tokens a sample: the prompt's full blocks once (shared), and
        each sample the rest (its copy of the prompt's last block, and blocks for its new tokens)."""
        shared = prompt // self.pool.block_size
        return shared + n * (self.pool.blocks_for(prompt + new) - shared)

    def _admit(self) -> None:
        """Preempted rows first, then queued prompts, first come first served, while the pool has
        blocks for their prompts and the batch has room."""
        room, budget = self.max_concurrent - len(self._running), self.pool.available
        with self._cond:
            resume = []
            while self._resume and room > 0:
                entry = self._resume[0]
                if entry.gone:
                    self._resume.popleft()
                    continue
                need = self._blocks_needed(len(entry.row.prompt) + len(entry.row.ids), 1)
                if need > budget:
                    break
                resume.append(self._resume.popleft())
                room, budget = room - 1, budget - need
            groups = []
            while self._pending and not self._resume:
                group = self._pending[0]
                if group.job.cancelled or group.job.failed:
                    self._pending.popleft()
                    continue
                n = group.params.n if group.params.max_new_tokens else 0
                need = self._blocks_needed(len(group.prompt), n)
                if n > room or need > budget:
                    break
                groups.append(self._pending.popleft())
                room, budget = room - n, budget - need
        if resume:
            self._prefill([], resume)
        plain = []
        for group in groups:
            if group.job.cancelled or group.job.failed:
                continue
            try:
                if group.prompt_logprobs is not None or not group.params.max_new_tokens:
                    self._admit_group(group)
                else:
                    plain.append(group)
            except Exception as e:
                log.exception("prefill failed")
                self.counters["failed"] += 1
                group.job.fail(f"generation failed: {type(e).__name__}: {e}")
        if plain:
            self._prefill(plain, [])

    def _prefill(self, groups: list[_Group], resume: list[_Entry]) -> None:
        entries = [
            _Entry(row, g)
            for g in groups
            for row in make_rows([g.prompt], g.params, self.tokenizer, g.stops, self.pool.k.device)
        ]
        for entry in entries:  # make_rows numbers prompts from 0; the job's choice index needs its own
            entry.row.prompt_index = entry.group.prompt_index
        try:
            logits = start(self.core, [e.row for e in entries], [e.row for e in resume])
        except Exception as e:
            for entry in (*entries, *resume):
                if entry.row.seq is not None:
                    self.core.free(entry.row.seq)
                    entry.row.seq = None
            if isinstance(e, OutOfBlocks):  # admission estimated wrong: try again after the next step
                with self._cond:
                    self._resume.extendleft(reversed(resume))
                    self._pending.extendleft(reversed(groups))
                return
            if len(groups) + len(resume) > 1:  # find the request at fault: the others go on
                for group in groups:
                    self._prefill([group], [])
                for entry in resume:
                    self._prefill([], [entry])
                return
            log.exception("prefill failed")
            jobs = {id(x.group.job): x.group.job for x in (*entries, *resume)}
            self.counters["failed"] += len(jobs)
            for job in jobs.values():
                job.fail(f"generation failed: {type(e).__name__}: {e}")
            return
        self._add([*entries, *resume], logits)

    def _admit_group(self, group: _Group) -> None:
        """A prompt whose logprobs are asked for (every position computed, no prefix reuse), or with
        max_new_tokens = 0 (nothing to decode)."""
        seq = self.core.sequence(group.prompt, reuse=False, compute=len(group.prompt))
        try:
            logits = self.core.forward([seq], [len(group.prompt)])
        except Exception:
            self.core.free(seq)
            raise
        if group.prompt_logprobs is not None:
            group.job.emit(PromptLogprobs(group.prompt_index, self._prompt_logprobs(group, logits)))
        params, n = group.params, group.params.n
        if not params.max_new_tokens:
            self.core.free(seq)
            for j in range(n):
                done = Completion("", [], "length", [] if params.logprobs is not None else None, group.prompt_index)
                group.job.emit(Finished(group.prompt_index * n + j, done, 0))
            return
        rows = make_rows([group.prompt], params, self.tokenizer, group.stops, self.pool.k.device)
        for j, row in enumerate(rows):
            row.prompt_index = group.prompt_index
            row.seq = seq if j == 0 else self.core.fork(seq)
        self._add([_Entry(row, group) for row in rows], logits[-1:].expand(n, -1))

    def _add(self, entries: list[_Entry], logits: Tensor) -> None:
        self._running.extend(entries)
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])

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
    def _sample(self) -> None:
        rows = [e.row for e in self._running]
        assert self._logits is not None
        before = sum(len(r.ids) for r in rows)
        advance(rows, self._logits, self.tokenizer.eot_id, self.max_len)
        self._count_step(sum(len(r.ids) for r in rows) - before, len(rows))
        for entry in self._running:
            self._send(entry)

    def _count_step(self, tokens: int, batch: int) -> None:
        """One decoding step of `batch` rows that produced `tokens` tokens."""
        self.counters["tokens"] += tokens
        self.counters["steps"] += 1
        self.counters["max_batch"] = max(self.counters["max_batch"], batch)

    def _send(self, entry: _Entry) -> None:
        job, row = entry.group.job, entry.row
        if job.cancelled or job.failed:
            return
        if row.error is not None:
            self.counters["failed"] += 1
            job.fail(f"generation failed: {row.error}")
            return
        tracker = row.tracker
        assert tracker is not None
        if self.observer is not None:
            self._observe(entry)
        if row.finish_reason is None:
            text = tracker.delta() if job.deltas else ""
            if text:
                new = row.logprobs[entry.sent_logprobs :] if row.logprobs is not None else []
                entry.sent_logprobs += len(new)
                job.emit(Delta(row.index, text, new))
            return
        tracker.finish()
        keep = tracker.kept_tokens()
        text = tracker.delta(final=True)
        new = row.logprobs[entry.sent_logprobs : keep] if row.logprobs is not None else []
        if (text or new) and job.deltas:
            job.emit(Delta(row.index, text, new))
        job.emit(Finished(row.index, row.completion(), len(row.ids)))
        self.counters["completed"] += 1

    def _observe(self, entry: _Entry) -> None:
        now, observer = time.monotonic(), self.observer
        assert observer is not None
        if entry.last_token is None:
            observer.first_token(now - entry.group.job.submitted)
        else:
            observer.next_token(now - entry.last_token)
        entry.last_token = now
        if entry.row.finish_reason is not None:
            observer.finished(now - entry.group.job.submitted, len(entry.row.prompt))

    def _retire(self) -> None:
        """Drop finished and cancelled rows (their blocks go back to the pool) and their logits."""
        keep = [i for i, e in enumerate(self._running) if not e.gone]
        if len(keep) == len(self._running):
            return
        cancelled = {id(e.group.job): e.group.job for e in self._running if e.group.job.cancelled and not e.row.done}
        self.counters["cancelled"] += len(cancelled)
        for i, entry in enumerate(self._running):
            if i not in keep:
                self._release(entry)
        self._running = [self._running[i] for i in keep]
        if self._logits is not None:
            self._logits = self._logits[torch.tensor(keep, dtype=torch.long)] if keep else None

    def _release(self, entry: _Entry) -> None:
        """Give back a row's blocks (and its draft model's)."""
        if entry.row.seq is not None:
            self.core.free(entry.row.seq)
            entry.row.seq = None
        if self.speculator is not None:
            self.speculator.release(entry.row)

    def _make_room(self, keep: int | None = None) -> None:
        """The first `keep` running rows (default all) need room for the positions of their next step:
        preempt the most recently admitted rows until the pool has it."""
        pool, bs, new = self.pool, self.pool.block_size, self._new_tokens

        def needs(entry: _Entry) -> int:
            seq = entry.row.seq
            grow = pool.blocks_for(seq.length + new) - pool.blocks_for(seq.length)
            partial = seq.length % bs and pool.refs[seq.blocks[seq.length // bs]] > 1
            return grow + int(partial)  # a shared block is copied before it is written

        while sum(needs(e) for e in self._running[:keep]) > pool.available and len(self._running) > 1:
            entry = self._running.pop()
            pool.preempt(entry.row.seq)
            entry.row.seq = None
            if self.speculator is not None:
                self.speculator.release(entry.row)
            with self._cond:
                self._resume.appendleft(entry)

    # ---- the batched decoding step -----------------------------------------------------------
    def _decode(self) -> Tensor:
        """Feed each running row its sampled token; next-token logits (B, V) float32."""
        return self.core.forward([e.row.seq for e in self._running])
