"""Learning-rate and batch-size schedules: pure functions of the step / tokens seen, so resuming needs
only the step counter and token count to land on the same values."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, warmup_steps: int, decay_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to `peak` over `warmup_steps`, then cosine decay to `min_ratio * peak` at
    `decay_steps`, constant after (GPT-3, Brown et al. 2020, appendix B: decay to 10% of the peak).

    `step` counts from 0; step 0 of a warm-up already takes a small non-zero rate.
    """
    floor = min_ratio * peak
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if step >= decay_steps:
        return floor
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def batch_size_at(tokens: int, full: int, start: int, ramp_tokens: int, multiple: int = 1) -> int:
    """Global batch (sequences) after `tokens` tokens: a linear ramp from `start` to `full` over the first
    `ramp_tokens` tokens (GPT-3 ramps from 32k tokens to the full batch over 4-12B tokens), rounded
    down to a multiple of `multiple` (the world size) and at least `multiple`."""
    if ramp_tokens <= 0 or tokens >= ramp_tokens:
        size = full
    else:
        size = int(start + (full - start) * tokens / ramp_tokens)
        size = max(1, min(full, size))
    if full % multiple:
        raise ValueError(f"train.batch_size {full} must be a multiple of the world size {multiple}")
    return max(multiple, size // multiple * multiple)
