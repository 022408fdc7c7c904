"""The paged KV cache: one pool of fixed-size blocks per model, block tables, prefix caching.

Keys and values live in two tensors (n_layer, num_blocks, nh, block_size, hs). A sequence owns a block
table (the pool's block ids in position order) and takes a block each `block_size` tokens; when it
ends its blocks go back. Nothing is preallocated per request, so memory follows the tokens in use
(vLLM's PagedAttention, Kwon et al. 2023).

Prefix caching: a full block is keyed by a hash chain of the tokens up to its end (BLAKE2b of the
previous block's key and this block's tokens, so a key names the whole prefix, not just 16 tokens).
A new sequence whose tokens start with cached blocks shares them (reference counts) and computes only
the rest. A block whose last user ended keeps its key and waits, least recently used first, to be
reused by another sequence or evicted when the pool needs room.

Blocks shared by several sequences (n samples of one prompt, beams, prefix hits) are never written:
a sequence about to write into a shared block gets a copy first (copy-on-write).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from hashlib import blake2b

import torch
from torch import Tensor

from gptlab.config import ModelConfig

BLOCK_SIZE = 16  # vLLM's default: small enough to waste < 16 tokens a sequence, large enough for the C step
HALF_MAX = torch.finfo(torch.float16).max


class OutOfBlocks(RuntimeError):
    """The pool has no free block left (the caller preempts a sequence or waits)."""


def to_cache(x: Tensor, cache: Tensor) -> Tensor:
    """Keys or values `x` as a KV cache of `cache`'s dtype stores them: a float16 cache holds values
    beyond its range as its largest finite value, not inf (as gptlab's CPU kernels write them)."""
    x = x.clamp(-HALF_MAX, HALF_MAX) if cache.dtype == torch.float16 and x.dtype != torch.float16 else x
    return x.to(cache.dtype)


def block_key(parent: bytes, tokens: Seq[int]) -> bytes:
    """The prefix-cache key of a full block: its tokens chained onto the key of the block before."""
    return blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass(eq=False)
class Sequence:
    """One sequence's view of the pool: its tokens, how many of them are in the cache, and its blocks."""

    tokens: list[int]
    """Every token of the sequence so far; those past `length` are still to be computed."""
    blocks: list[int] = field(default_factory=list)
    """Block table: pool block ids in position order."""
    length: int = 0
    """Tokens whose keys and values are in the cache (positions 0 .. length - 1)."""
    keys: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of the sequence's leading full blocks (its registered prefix)."""

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.length


@dataclass
class CacheStats:
    hits: int = 0
    """Prompt tokens whose keys and values came from the prefix cache."""
    misses: int = 0
    """Prompt tokens computed (not found in the prefix cache)."""
    evictions: int = 0
    """Cached blocks given up to make room."""
    preemptions: int = 0
    """Sequences whose blocks were taken back mid-generation (recomputed when they resume)."""


class KVPool:
    """Paged keys and values for `num_blocks` blocks of `block_size` tokens of one model."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = BLOCK_SIZE,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        prefix_caching: bool = True,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs blocks of tokens, got {num_blocks} blocks of {block_size}")
        self.config, self.block_size, self.num_blocks = config, block_size, num_blocks
        self.prefix_caching = prefix_caching
        shape = (config.n_layer, num_blocks, config.n_head, block_size, config.head_size)
        # zeros, not empty: attention multiplies masked slots by a zero weight, and 0 * NaN would be NaN
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids first
        self._idle: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks holding a prefix, LRU first
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self.stats = CacheStats()
        self.peak_in_use = 0

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    @property
    def capacity(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    @property
    def available(self) -> int:
        """Blocks that can be handed out now: free ones and idle cached ones (evicted on demand)."""
        return len(self._free) + len(self._idle)

    @property
    def in_use(self) -> int:
        return self.num_blocks - self.available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- blocks --------------------------------------------------------------------------------
    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._idle:
            block, _ = self._idle.popitem(last=False)  # least recently used prefix goes
            del self._by_key[self._key_of.pop(block)]
            self.stats.evictions += 1
        else:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks of {self.block_size} tokens are in use")
        self.refs[block] = 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return block

    def _share(self, block: int) -> None:
        if self.refs[block] == 0:
            self._idle.pop(block)
        self.refs[block] += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)

    def _release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._key_of:
                self._idle[block] = None  # most recently used end
            else:
                self._free.append(block)

    # ---- sequences -----------------------------------------------------------------------------
    def attach(self, seq: Sequence, *, reuse: bool = True, compute: int = 1) -> int:
        """Share the cached blocks that `seq`'s tokens start with (it must hold none yet), leaving at
        least its last `compute` tokens to compute (their logits are what a caller wants; the block the
        first of them goes into is then never one that others share); returns the tokens found."""
        if seq.blocks or seq.length:
            raise ValueError("attach takes a sequence with no blocks")
        bs, found, parent = self.block_size, 0, b""
        if self.prefix_caching and reuse:
            for i in range(max(0, len(seq.tokens) - max(compute, 1)) // bs):
                key = block_key(parent, seq.tokens[i * bs : (i + 1) * bs])
                block = self._by_key.get(key)
                if block is None:
                    break
                self._share(block)
                seq.blocks.append(block)
                seq.keys.append(key)
                parent, found = key, found + bs
        seq.length = found
        self.stats.hits += found
        self.stats.misses += len(seq.tokens) - found
        return found

    def reserve(self, seq: Sequence, tokens: int) -> None:
        """Make the blocks for `seq`'s next `tokens` positions exclusively its own: new blocks as it
        grows, and a private copy of a shared block it is about to write into. Raises OutOfBlocks
        (having taken nothing) when the pool cannot provide them."""
        bs = self.block_size
        first, end = seq.length, seq.length + tokens
        if tokens <= 0:
            return
        shared_tail = first % bs != 0 and self.refs[seq.blocks[first // bs]] > 1
        needed = self.blocks_for(end) - len(seq.blocks) + shared_tail
        if needed > self.available:
            raise OutOfBlocks(f"need {needed} KV blocks, {self.available} of {self.num_blocks} are available")
        if shared_tail:
            i = first // bs
            old, new = seq.blocks[i], self._take()
            self.k[:, new] = self.k[:, old]
            self.v[:, new] = self.v[:, old]
            self._release(old)
            seq.blocks[i] = new
        while len(seq.blocks) < self.blocks_for(end):
            seq.blocks.append(self._take())

    def commit(self, seq: Sequence, tokens: int) -> None:
        """Record that `seq`'s next `tokens` tokens are now in the cache, and key its newly full blocks
        for the prefix cache (a block whose prefix is cached already, computed twice at once, stays
        private)."""
        seq.length += tokens
        if not self.prefix_caching:
            return
        bs = self.block_size
        while len(seq.keys) < seq.length // bs:
            i = len(seq.keys)
            key = block_key(seq.keys[-1] if seq.keys else b"", seq.tokens[i * bs : (i + 1) * bs])
            seq.keys.append(key)
            block = seq.blocks[i]
            if key not in self._by_key and block not in self._key_of:
                self._by_key[key] = block
                self._key_of[block] = key

    def fork(self, seq: Sequence) -> Sequence:
        """A copy of `seq` sharing all its blocks (n samples of one prompt, beams)."""
        for block in seq.blocks:
            self._share(block)
        return Sequence(list(seq.tokens), list(seq.blocks), seq.length, list(seq.keys))

    def free(self, seq: Sequence) -> None:
        """Give `seq`'s blocks back (full ones stay cached for later prefix hits until evicted)."""
        for block in seq.blocks:
            self._release(block)
        seq.blocks, seq.length, seq.keys = [], 0, []

    def truncate(self, seq: Sequence, length: int) -> None:
        """Cut `seq` back to its first `length` tokens (rejected speculative tokens): blocks wholly past
        them go back, and the block the cut falls inside, which the sequence will write into again,
        stops being a prefix-cache entry (others sharing it keep it; the next write copies it)."""
        if not 0 <= length <= len(seq.tokens):
            raise ValueError(f"cannot truncate a sequence of {len(seq.tokens)} tokens to {length}")
        bs = self.block_size
        del seq.tokens[length:]
        seq.length = min(seq.length, length)
        keep = self.blocks_for(seq.length)
        for block in seq.blocks[keep:]:
            self._release(block)
        del seq.blocks[keep:]
        del seq.keys[seq.length // bs :]
        if seq.length % bs:
            tail = seq.blocks[-1]
            if self.refs[tail] == 1 and tail in self._key_of:  # only we hold it: its key would go stale
                del self._by_key[self._key_of.pop(tail)]

    def preempt(self, seq: Sequence) -> None:
        """Take `seq`'s blocks back mid-generation; it recomputes its tokens when it resumes (its full
        blocks may still be cached then)."""
        self.free(seq)
        self.stats.preemptions += 1

    def table(self, seqs: Seq[Sequence], repeats: Seq[int] | None = None) -> Tensor:
        """Block tables of `seqs` as a (len(seqs), widest) int64 tensor padded with block 0, or with
        `repeats` each sequence's row repeats[i] times (a row per position it computes)."""
        width = max(1, *(len(s.blocks) for s in seqs))
        rows = [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
        if repeats is not None:
            rows = [row for row, n in zip(rows, repeats, strict=True) for _ in range(n)]
        return torch.tensor(rows, dtype=torch.int64)

    def check(self) -> None:
        """Raise AssertionError unless the pool's bookkeeping is consistent (tests)."""
        free, idle = set(self._free), set(self._idle)
        assert len(free) == len(self._free), "a block is free twice"
        assert not free & idle, "a block is both free and cached"
        for b in range(self.num_blocks):
            assert self.refs[b] >= 0, f"block {b} has {self.refs[b]} references"
            assert (self.refs[b] == 0) == (b in free or b in idle), f"block {b}: refs {self.refs[b]}"
        assert idle <= set(self._key_of), "an idle block holds no prefix"

    def summary(self) -> dict[str, object]:
        """What `/health` and `--verbose` show."""
        s = self.stats
        looked = s.hits + s.misses
        return {
            "block_size": self.block_size,
            "blocks_total": self.num_blocks,
            "blocks_in_use": self.in_use,
            "blocks_peak": self.peak_in_use,
            "blocks_cached": len(self._key_of),
            "bytes_per_block": self.bytes_per_block,
            "preemptions": s.preemptions,
            "prefix_cache": {
                "enabled": self.prefix_caching,
                "hits": s.hits,
                "misses": s.misses,
                "hit_rate": round(s.hits / looked, 4) if looked else 0.0,
                "evictions": s.evictions,
            },
        }
