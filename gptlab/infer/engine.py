"""The inference engine: a model, its paged KV pool and the backends that compute on it.

`InferenceEngine.forward(seqs)` computes every pending token of each sequence and returns the logits
callers sample from. Sequences that feed one token (decoding) run together on the fastest backend that
takes the batch (the C step on gptlab's CPU kernels, else the torch reference); on the C step, so do
the few tokens of a sequence already under way (the K + 1 positions a speculative step verifies), a row
per position. Sequences that feed more (prompts, recomputation after preemption) run through the
reference step, right-padded in batches. `generate`, `stream`, beam search, evaluation and the server
all decode through one engine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
from torch import Tensor

from gptlab.infer.cache import BLOCK_SIZE, KVPool, Sequence
from gptlab.infer.step import Step, TorchStep, reference_step
from gptlab.model import GPT

PREFILL_TOKENS = 8192
"""Most padded tokens (rows x longest) in one batch of the reference step: bounds its activations."""
VERIFY_TOKENS = 16
"""Most pending tokens of one sequence that the fast decoding step takes as rows (a speculative step's
K + 1): weight-bandwidth-bound, such rows cost little more than one; longer runs are prefills."""


@dataclass
class SpeculationStats:
    """Counters of speculative decoding on an engine (`gptlab.infer.speculative` keeps them)."""

    steps: int = 0
    """Verification forwards, counted per row (one target forward of a row's K + 1 positions)."""
    drafted: int = 0
    """Draft tokens proposed."""
    accepted: int = 0
    """Draft tokens the target accepted."""
    tokens: int = 0
    """Tokens the verification steps produced (accepted drafts plus one corrected or bonus token each)."""

    def summary(self) -> dict[str, object]:
        return {
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
            "tokens_per_step": round(self.tokens / self.steps, 4) if self.steps else 0.0,
        }


def kv_bytes_per_token(model: GPT, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.n_layer * c.n_embd * torch.empty(0, dtype=dtype).element_size()


def default_cache_tokens(model: GPT, dtype: torch.dtype, share: float = 0.25, most: int | None = None) -> int:
    """KV tokens that fit in `share` of the memory available now (GPU memory on a GPU), at most `most`,
    at least one full context."""
    device = model.transformer.wte.weight.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 4 << 30
    tokens = int(free * share) // kv_bytes_per_token(model, dtype)
    if most is not None:
        tokens = min(tokens, most)
    return max(tokens, model.config.n_ctx)


def fast_step(model: GPT) -> Step | None:
    """The C decoding step for a model prepared for gptlab's CPU kernels (`prepare_model`), else None."""
    if not str(getattr(model, "quantized", "")).endswith("-kernels"):
        return None
    from gptlab.infer.cpu.kernels import DecodeStep

    return DecodeStep(model)


class InferenceEngine:
    """Runs `model` over a paged KV pool of `kv_cache_tokens` tokens (default: what fits a quarter of
    the free memory, see `default_cache_tokens`) in blocks of `block_size`, with prefix caching unless
    `prefix_caching=False`. `kernels=False` keeps the torch reference even where the C step would run;
    `compile=True` decodes on the reference step `torch.compile`d. `kv_dtype` overrides the pool's dtype
    (by default the C step's: float16 for bfloat16 / int8 weights; else the model's)."""

    def __init__(
        self,
        model: GPT,
        *,
        kv_cache_tokens: int | None = None,
        block_size: int = BLOCK_SIZE,
        prefix_caching: bool = True,
        kernels: bool = True,
        compile: bool = False,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.reference = TorchStep(model, compile=compile)
        self.fast = fast_step(model) if kernels and not compile else None
        dtype = kv_dtype or (self.fast or self.reference).cache_dtype
        if kv_cache_tokens is None:
            kv_cache_tokens = default_cache_tokens(model, dtype)
        if not isinstance(kv_cache_tokens, int) or kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens must be a positive number of tokens, got {kv_cache_tokens!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive number of tokens, got {block_size!r}")
        device = model.transformer.wte.weight.device
        blocks = -(-kv_cache_tokens // block_size)
        self.pool = KVPool(
            model.config, blocks, block_size, dtype=dtype, device=device, prefix_caching=prefix_caching
        )
        self.speculation = SpeculationStats()

    # ---- sequences ---------------------------------------------------------------------------
    def sequence(self, tokens: Seq[int], *, reuse: bool = True, compute: int = 1) -> Sequence:
        """A sequence of `tokens` sharing whatever prefix of them the cache holds (unless reuse=False),
        leaving at least its last `compute` tokens to compute (the positions whose logits are wanted)."""
        tokens = [int(t) for t in tokens]
        c = self.model.config
        if not tokens:
            raise ValueError("a sequence needs at least one token (start empty prompts with <|endoftext|>)")
        if len(tokens) > c.n_ctx:
            raise ValueError(f"sequence of {len(tokens)} tokens exceeds the context of {c.n_ctx}")
        bad = [t for t in tokens if not 0 <= t < c.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for a vocabulary of {c.vocab_size}")
        seq = Sequence(tokens)
        self.pool.attach(seq, reuse=reuse, compute=compute)
        return seq

    def fork(self, seq: Sequence) -> Sequence:
        return self.pool.fork(seq)

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq)

    def truncate(self, seq: Sequence, length: int) -> None:
        """Keep `seq`'s first `length` tokens (and their cache), dropping the rest (see KVPool.truncate)."""
        self.pool.truncate(seq, length)

    # ---- computing ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, seqs: Seq[Sequence], n_logits: Seq[int] | None = None) -> Tensor:
        """Compute every pending token of `seqs`; logits float32 of each sequence's last token (B, V), or
        of its last n_logits[i] tokens, concatenated in order (sum(n_logits), V). Raises OutOfBlocks
        when the pool cannot hold the new tokens (blocks already reserved stay with their sequences)."""
        want = list(n_logits) if n_logits is not None else [1] * len(seqs)
        n_ctx = self.model.config.n_ctx
        for i, (seq, n) in enumerate(zip(seqs, want, strict=True)):
            if not 1 <= n <= seq.pending:
                raise ValueError(f"sequence {i} has {seq.pending} tokens to compute; cannot return logits of {n}")
            if len(seq.tokens) > n_ctx:
                raise ValueError(f"sequence {i} of {len(seq.tokens)} tokens exceeds the context of {n_ctx}")
        for seq in seqs:
            self.pool.reserve(seq, seq.pending)
        parts: list[Tensor | None] = [None] * len(seqs)
        # Decoding rows: one token each, or (on the fast step) a few tokens of a sequence already under
        # way, one row per position: the K + 1 a speculative step verifies, the accepted ones a draft
        # model catches up on. Prompts are prefills.
        most = VERIFY_TOKENS if self.fast is not None else 1
        one = [i for i, s in enumerate(seqs) if s.pending == 1 or (s.length and s.pending <= most)]
        if one:
            logits = self._decode([seqs[i] for i in one])
            offset = 0
            for i in one:
                offset += seqs[i].pending
                parts[i] = logits[offset - want[i] : offset]
        taken = set(one)
        rest = sorted((i for i in range(len(seqs)) if i not in taken), key=lambda i: -seqs[i].pending)
        while rest:
            longest, batch = seqs[rest[0]].pending, []
            while rest and (len(batch) + 1) * longest <= max(PREFILL_TOKENS, longest):
                batch.append(rest.pop(0))
            logits = self._prefill([seqs[i] for i in batch], [want[i] for i in batch])
            offset = 0
            for i in batch:
                parts[i] = logits[offset : offset + want[i]]
                offset += want[i]
        for seq in seqs:
            self.pool.commit(seq, seq.pending)
        return torch.cat(parts) if len(parts) != 1 else parts[0]  # type: ignore[arg-type]

    @torch.inference_mode()
    def greedy(self, seqs: Seq[Sequence], steps: int) -> list[list[int]] | None:
        """`steps` greedy tokens for each of `seqs` (one token pending each) in one call of the fast
        step, each fed back as the next step's token: the argmax after each step, -1 from a step whose
        logits have no finite maximum on. Every token fed is then computed and in the sequence (-1 fed
        as token 0), the last argmax not. None, with nothing done, where the fast step cannot take
        them (no C kernels, too many rows, or the steps would pass the context)."""
        n_ctx = self.model.config.n_ctx
        if (
            self.fast is None
            or not 0 < len(seqs) <= self.fast.max_rows
            or any(s.pending != 1 or len(s.tokens) + steps - 1 > n_ctx for s in seqs)
        ):
            return None
        for seq in seqs:
            self.pool.reserve(seq, steps)
        tokens = torch.tensor([s.tokens[-1] for s in seqs], dtype=torch.long)
        positions = torch.tensor([s.length for s in seqs], dtype=torch.long)
        out = self.fast.greedy(self.pool, tokens, positions, self.pool.table(seqs), steps).tolist()
        for seq, row in zip(seqs, out, strict=True):
            seq.tokens.extend(max(t, 0) for t in row[:-1])
            self.pool.commit(seq, steps)
        return out

    def _decode(self, seqs: list[Sequence]) -> Tensor:
        """A row for each pending token of `seqs` (rows of one sequence share its block table)."""
        rows = [(s, p) for s in seqs for p in range(s.length, len(s.tokens))]
        tokens = torch.tensor([s.tokens[p] for s, p in rows], dtype=torch.long)
        positions = torch.tensor([p for _, p in rows], dtype=torch.long)
        verifying = len(rows) != len(seqs)
        tables = self.pool.table(seqs, [s.pending for s in seqs] if verifying else None)
        # Several positions of one sequence (a speculative step's verification) always run on the fast
        # step, in calls of at most its rows if need be, exactly: there a row's logits have the bits of
        # plain decoding's, which the reference's GEMMs (int8 batches on AVX2 through fbgemm) or AMX
        # tiles (bfloat16 batches) would not keep.
        if self.fast is not None and (verifying or self.fast.runs(len(rows))):
            return self.fast.decode(self.pool, tokens, positions, tables, verifying)
        return self.reference.decode(self.pool, tokens, positions, tables)

    def _prefill(self, seqs: list[Sequence], n_logits: list[int]) -> Tensor:
        T = max(s.pending for s in seqs)
        tokens = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, s in enumerate(seqs):
            tokens[b, : s.pending] = torch.as_tensor(s.tokens[s.length :], dtype=torch.long)
        starts = torch.tensor([s.length for s in seqs], dtype=torch.long)
        lengths = torch.tensor([s.pending for s in seqs], dtype=torch.long)
        return reference_step(self.model, self.pool, tokens, starts, lengths, self.pool.table(seqs), n_logits)

    def summary(self) -> dict[str, object]:
        backend = "cpu-kernels" if self.fast is not None else "torch"
        out = {"backend": backend, "kv_dtype": str(self.pool.k.dtype).removeprefix("torch."), **self.pool.summary()}
        if self.speculation.steps:
            out["speculative"] = self.speculation.summary()
        return out
