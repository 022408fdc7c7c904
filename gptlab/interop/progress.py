"""Stage-by-stage progress of a long export: a line when a stage starts and one with its time when it ends.

Tracing a model into ONNX is one call with no progress of its own (a minute or more for GPT-2 small),
so the most an export can say is which stage it is in and how long each took; per-tensor work (GGUF)
shows a tqdm bar inside its stage.

    export: [1/3] loading runs/nano ...
    export: [1/3] done in 0.2 s
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class Progress:
    """Numbered stages written to `out` (default: stderr at the time of writing), with elapsed times and
    a total; `enabled=False` is silent."""

    def __init__(
        self, stages: int | None = None, label: str = "export", out: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.out, self.stages, self.label, self.enabled = out, stages, label, enabled
        self.done = 0
        self.began = time.perf_counter()

    def _say(self, text: str) -> None:
        if self.enabled:
            print(f"{self.label}: {text}", file=self.out or sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[None]:
        number = f"[{self.done + 1}/{self.stages}] " if self.stages else f"[{self.done + 1}] "
        self._say(f"{number}{text} ...")
        began = time.perf_counter()
        yield
        self.done += 1
        self._say(f"{number}done in {time.perf_counter() - began:.1f} s")

    def finish(self, what: str) -> None:
        self._say(f"{what} in {time.perf_counter() - self.began:.1f} s")
