"""Sampling parameters and the logits processors every decoding path shares.

`process_logits` then `sample_next` is the whole of "choose the next token": `generate`, `stream`,
beam search and the serving engine's continuous batching all call these two, so a request gives the
same tokens whichever path runs it. Rows of one batch may carry different `SamplingParams`.

Semantics follow the references users compare against:
- repetition_penalty: Hugging Face (CTRL, Keskar et al. 2019): logits of tokens already present
  (prompt included) are divided by the penalty when positive, multiplied when negative.
- presence_penalty / frequency_penalty: OpenAI: `logit -= presence * (count > 0) + frequency * count`
  over the generated tokens only.
- logit_bias: OpenAI: `logit += bias[token]` (bias in [-100, 100]; -100 effectively bans a token, 100
  effectively forces it), after the penalties and before temperature, so a greedy row sees it too.
- temperature, then top-k, top-p (nucleus, Holtzman et al. 2019), then min-p, in Hugging Face's order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import Tensor

from gptlab.infer.constrain import Constraint

MAX_LOGPROBS = 20  # OpenAI's limit on `top_logprobs`
GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy (vLLM's rule): dividing logits by 1e-300 overflows to inf."""
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's range
PENALTY_RANGE = (0.01, 100.0)
"""Repetition penalties outside this range would scale logits past what float32 softmax handles."""


@dataclass
class SamplingParams:
    """How to choose tokens; the same fields as OpenAI's and Hugging Face's generation options."""

    max_new_tokens: int = 64
    """Most tokens to generate per completion (the prompt not counted)."""
    temperature: float = 1.0
    """Softmax temperature; 0 (or anything below 1e-5) means greedy (always the most likely token)."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p; 1 disables."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 disables."""
    repetition_penalty: float = 1.0
    """Hugging Face repetition penalty over prompt and generated tokens; 1 disables, >1 discourages."""
    presence_penalty: float = 0.0
    """OpenAI presence penalty: subtracted once from every token generated so far."""
    frequency_penalty: float = 0.0
    """OpenAI frequency penalty: subtracted per occurrence of a token generated so far."""
    n: int = 1
    """Completions per prompt (independent samples, or the n best beams)."""
    num_beams: int = 1
    """Beam search width; 1 means sampling / greedy."""
    length_penalty: float = 1.0
    """Beam search: a finished beam scores sum(logprobs) / length**length_penalty (Hugging Face)."""
    stop: list[str] = field(default_factory=list)
    """Stop when the text contains one of these; the stop text is not returned."""
    seed: int | None = None
    """Seed of a private random generator: the same seed gives the same tokens."""
    logprobs: int | None = None
    """Return each token's log-probability with this many top alternatives (0: the token's own only)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """OpenAI's logit_bias: token id -> a number in [-100, 100] added to that token's logit."""
    constraint: Constraint | None = None
    """Output must match this JSON Schema / regex / grammar (`gptlab.infer.constrain`; sampling only)."""

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the first invalid field; returns self for chaining."""

        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "an integer >= 0")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a number >= 0 (0 means greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 disables)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1] (1 disables)")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1] (0 disables)")
        lo, hi = PENALTY_RANGE
        if not is_num(self.repetition_penalty) or not lo <= self.repetition_penalty <= hi:
            raise bad("repetition_penalty", f"in [{lo}, {hi}] (1 disables)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2] (OpenAI's range; 0 disables)")
        if not is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise bad("num_beams", "an integer >= 1 (1 disables beam search)")
        if not is_num(self.length_penalty):
            raise bad("length_penalty", "a finite number")
        if self.num_beams > 1 and self.n > self.num_beams:
            raise ValueError(f"SamplingParams.n ({self.n}) cannot exceed num_beams ({self.num_beams})")
        if self.num_beams > 1 and (self.top_k or self.top_p < 1 or self.min_p):
            raise ValueError("beam search is deterministic: top_k, top_p and min_p apply only to sampling")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "an integer or None")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")
        if self.constraint is not None:
            if not isinstance(self.constraint, Constraint):
                raise bad("constraint", "a gptlab.infer.constrain.Constraint or None")
            self.constraint.validate()
            if self.num_beams > 1:
                raise ValueError(
                    "constrained decoding is not available with beam search (num_beams > 1): "
                    "sample, or decode greedily (temperature 0), under the constraint"
                )
        if self.logit_bias is None:
            self.logit_bias = {}
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"SamplingParams.logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
        lo, hi = LOGIT_BIAS_RANGE
        for token, bias in self.logit_bias.items():
            if not is_int(token) or token < 0:
                raise ValueError(f"SamplingParams.logit_bias: key {token!r} is not a token id (an integer >= 0)")
            if not is_num(bias) or not lo <= bias <= hi:
                raise ValueError(
                    f"SamplingParams.logit_bias[{token}] must be a number in [{lo:g}, {hi:g}], got {bias!r}"
                )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def plain_argmax(self) -> bool:
        """Greedy, and nothing moves the argmax of the model's logits (no penalties, no logit bias;
        a constraint is the row's, not these parameters')."""
        return self.greedy and self.repetition_penalty == 1 and not (
            self.presence_penalty or self.frequency_penalty or self.logit_bias
        )

    def updated(self, **overrides: object) -> SamplingParams:
        """A validated copy with some fields replaced; unknown names raise ValueError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; valid: {sorted(known)}")
        return replace(self, **overrides).validate()


def _per_row(params: SamplingParams | Sequence[SamplingParams], batch: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * batch
    params = list(params)
    if len(params) != batch:
        raise ValueError(f"got {len(params)} SamplingParams for a batch of {batch} rows")
    return params


def _column(values: list[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)  # (B, 1)


def token_counts(ids: Sequence[Sequence[int]] | Tensor, batch: int, vocab: int, device: torch.device) -> Tensor:
    """(B, V) counts of each token id per row; negative ids (padding) are ignored."""
    counts = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
    if isinstance(ids, Tensor):
        index = ids.to(device=device, dtype=torch.long)
    else:
        width = max((len(r) for r in ids), default=0)
        if width == 0:
            return counts
        index = torch.full((batch, width), -1, dtype=torch.long)
        for b, row in enumerate(ids):
            if len(row):
                index[b, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        index = index.to(device)
    keep = index >= 0
    counts.scatter_add_(1, index.clamp(min=0), keep.to(counts.dtype))
    return counts


def process_logits(
    logits: Tensor,
    generated_ids: Sequence[Sequence[int]] | Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]] | Tensor | None = None,
    *,
    warp: bool = True,
) -> Tensor:
    """Penalised and (with warp) temperature-scaled, top-k/top-p/min-p filtered logits, (B, V) float32.

    `generated_ids[b]` are row b's tokens generated so far and `prompt_ids[b]` its prompt (the
    repetition penalty sees both; presence and frequency penalties only the generated ones); ids < 0
    are padding. Filtered tokens get -inf. Greedy rows (temperature 0) are penalised but not warped.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch, vocab), got {tuple(logits.shape)}")
    B, V = logits.shape
    rows = _per_row(params, B)
    logits = logits.float()
    if any(p.repetition_penalty != 1 for p in rows):
        seen = token_counts(generated_ids, B, V, logits.device)
        if prompt_ids is not None:
            seen += token_counts(prompt_ids, B, V, logits.device)
        penalty = _column([p.repetition_penalty for p in rows], logits)
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen > 0, penalised, logits)
    if any(p.presence_penalty or p.frequency_penalty for p in rows):
        counts = token_counts(generated_ids, B, V, logits.device)
        presence = _column([p.presence_penalty for p in rows], logits)
        frequency = _column([p.frequency_penalty for p in rows], logits)
        logits = logits - (counts > 0).to(logits.dtype) * presence - counts * frequency
    if any(p.logit_bias for p in rows):
        logits = logits + logit_bias_rows(rows, V, logits.device)
    if warp:
        logits = _warp(logits, rows)
    return logits


def logit_bias_rows(params: Sequence[SamplingParams], vocab: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, V) float32 of each row's `logit_bias` (zeros elsewhere); raises ValueError for an id outside
    the vocabulary."""
    bias = torch.zeros(len(params), vocab, dtype=torch.float32)
    for b, p in enumerate(params):
        if not p.logit_bias:
            continue
        ids = list(p.logit_bias)
        if max(ids) >= vocab:
            raise ValueError(f"logit_bias names token id {max(ids)}, outside the vocabulary of {vocab} tokens")
        bias[b, ids] = torch.tensor([float(p.logit_bias[i]) for i in ids])
    return bias.to(device)


def _warp(logits: Tensor, rows: list[SamplingParams]) -> Tensor:
    sampled = [not p.greedy for p in rows]
    if not any(sampled):
        return logits
    if any(p.temperature != 1 and not p.greedy for p in rows):
        logits = logits / _column([1.0 if p.greedy else p.temperature for p in rows], logits)
    V = logits.shape[-1]
    ks = [min(p.top_k, V) if (p.top_k and s) else V for p, s in zip(rows, sampled, strict=True)]
    if min(ks) < V:
        kth = torch.topk(logits, max(ks), dim=-1).values  # (B, max k), descending
        threshold = kth.gather(1, torch.tensor(ks, device=logits.device).unsqueeze(1) - 1)
        threshold[torch.tensor([k == V for k in ks], device=logits.device)] = -math.inf
        logits = logits.masked_fill(logits < threshold, -math.inf)
    if any(p.top_p < 1 and s for p, s in zip(rows, sampled, strict=True)):
        top_p = _column([p.top_p if s else 1.0 for p, s in zip(rows, sampled, strict=True)], logits)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False  # always keep the most likely token
        drop_sorted &= top_p < 1
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), -math.inf)
    if any(p.min_p > 0 and s for p, s in zip(rows, sampled, strict=True)):
        min_p = _column([p.min_p if s else 0.0 for p, s in zip(rows, sampled, strict=True)], logits)
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p
        logits = logits.masked_fill(probs < threshold, -math.inf)
    return logits


def argmax(logits: Tensor) -> Tensor:
    """logits.argmax(-1) (the first maximum; NaN counts as the maximum, as in torch). On CPU through
    numpy, whose vectorised argmax over GPT-2's 50,257 logits takes ~7 us to torch's ~75 us: 1-2% of
    an int8 token."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(np.asarray(logits.numpy().argmax(-1), dtype=np.int64))
    return logits.argmax(dim=-1)


def best_tokens(logits: Tensor) -> tuple[list[int], list[bool]]:
    """Each row's argmax (`argmax`) and whether the row cannot be sampled: its logits are NaN or +inf
    somewhere, or -inf everywhere, which its maximum says in one look (NaN counts as the maximum).
    One pass through numpy on CPU: a step's few torch calls on a (B, V) tensor cost more than a small
    draft model's forward."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        values = logits.numpy()
        best = values.argmax(-1)
        top = values[np.arange(len(best)), best]
        return best.tolist(), (~np.isfinite(top)).tolist()
    best = argmax(logits)
    return best.tolist(), (~torch.isfinite(logits.gather(1, best[:, None]).squeeze(1))).tolist()


def sample_checked(
    logits: Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generators: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> tuple[list[int], list[bool]]:
    """`sample_next` for every row that can be sampled, and which rows cannot (`best_tokens`); those
    get a stand-in token, so the batch's draws stay valid for the others."""
    best, broken = best_tokens(logits)
    rows = _per_row(params, logits.shape[0])
    if all(p.greedy for p in rows):
        return best, broken
    if any(broken):
        logits = logits.masked_fill(torch.tensor(broken, device=logits.device)[:, None], 0.0)
    return sample_next(logits, rows, generators).tolist(), broken


def sample_next(
    logits: Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generators: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> Tensor:
    """Next token per row (B,) int64 from `process_logits` output: argmax for greedy rows, else a
    draw from softmax(logits) using that row's generator (or one shared generator, or torch's global one).
    """
    B = logits.shape[0]
    rows = _per_row(params, B)
    greedy = argmax(logits)
    if all(p.greedy for p in rows):
        return greedy
    probs = logits.float().softmax(dim=-1)
    if generators is None or isinstance(generators, torch.Generator):
        drawn = torch.multinomial(probs, 1, generator=generators).squeeze(1)
    else:
        if len(generators) != B:
            raise ValueError(f"got {len(generators)} generators for a batch of {B} rows")
        drawn = torch.stack([torch.multinomial(probs[b], 1, generator=g).squeeze(0) for b, g in enumerate(generators)])
    is_greedy = torch.tensor([p.greedy for p in rows], device=logits.device)
    return torch.where(is_greedy, greedy, drawn)


def make_generator(seed: int | None, sample: int = 0, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private generator for completion `sample` of a request with `seed` (None: torch's global RNG).

    Each of the n samples of one request gets its own stream, so they differ, while the same
    (seed, sample) always replays the same draws whatever else shares the batch.
    """
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((seed + sample * 0x9E3779B97F4A7C15) % (1 << 63))
    return g


def top_logprobs(logits: Tensor, chosen: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Raw model log-probabilities (before penalties and temperature, as OpenAI reports them):
    (B,) of the chosen tokens, and the top-k (B, k) values and ids."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logp.gather(1, chosen.view(-1, 1)).squeeze(1)
    if k == 0:
        empty = logp.new_empty(logp.shape[0], 0)
        return chosen_lp, empty, empty.long()
    values, ids = torch.topk(logp, k, dim=-1)
    return chosen_lp, values, ids
