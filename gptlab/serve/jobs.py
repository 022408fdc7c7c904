"""What a request sees of the engine: a `Job` and the events the engine sends it.

The engine thread never touches asyncio objects directly: `Job.emit` posts an event to the engine
(`Engine.post`), and the engine hands each step's events to the request's event loop in one
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from gptlab.infer.rows import Completion, TokenLogprob


class Scheduler(Protocol):
    """What a job needs of the engine that runs it (`gptlab.serve.engine.Engine`)."""

    def post(self, job: Job, event: object) -> None: ...
    def wake(self) -> None: ...


# ---- events sent from the engine thread to a request -------------------------------------------
@dataclass
class Delta:
    index: int
    """Choice index: prompt_index * n + sample."""
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Finished:
    index: int
    completion: Completion
    generated: int
    """Tokens sampled (the usage count), including any cut off by a stop sequence."""


@dataclass
class PromptLogprobs:
    prompt_index: int
    logprobs: list[TokenLogprob | None]
    """One per prompt token; None for the first (nothing predicts it)."""


@dataclass
class Failed:
    message: str


class QueueFull(Exception):
    pass


class EngineError(Exception):
    pass


class Job:
    """A submitted request: prompts x n completions. Created and read on the asyncio side; the engine
    thread only calls `emit` and `fail`, whose events reach the request's event loop once per engine step.
    `deltas=False` (a non-streaming request): no Delta events, only the finished completions."""

    def __init__(
        self, engine: Scheduler, n_choices: int, loop: asyncio.AbstractEventLoop, deltas: bool = True
    ) -> None:
        self.engine, self.n_choices, self.loop, self.deltas = engine, n_choices, loop, deltas
        self.submitted = time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.failed = False
        self.finished = False

    def cancel(self) -> None:
        """Stop generating (client gone): the engine frees the job's slots before its next step."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self.engine.wake()

    async def events(self) -> AsyncIterator[Delta | Finished | PromptLogprobs]:
        """Events until every choice has finished; raises EngineError if the engine failed the job."""
        left = self.n_choices
        while left:
            event = await self.queue.get()
            if isinstance(event, Failed):
                self.finished = True
                raise EngineError(event.message)
            if isinstance(event, Finished):
                left -= 1
            yield event
        self.finished = True

    def emit(self, event: object) -> None:
        self.engine.post(self, event)

    def fail(self, message: str) -> None:
        if not self.failed:
            self.failed = True
            self.emit(Failed(message))


def deliver(items: list[tuple[Job, object]]) -> None:
    for job, event in items:
        job.queue.put_nowait(event)
