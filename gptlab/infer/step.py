"""The cached forward step over the paged KV cache: the one reference implementation.

`reference_step` runs any mix of rows through the model: each row feeds its next tokens (a prompt, the
rest of a prompt after a prefix-cache hit, or one decoded token) at its own positions, writes their
keys and values into its blocks, and attends to its cached tokens through its block table. Rows are
right-padded to one length; padding writes nothing and its outputs are dropped. This is the same maths
as `GPT.forward` (which the tests hold it to) with the cache in between.

Backends sit behind one interface (`Step`): `TorchStep` is the reference; `gptlab.infer.cpu.DecodeStep`
runs a whole decoding step (one token per row) in one C call on gptlab's CPU kernels and is tested
against it.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from gptlab.infer.cache import KVPool, to_cache
from gptlab.model import GPT


class Step(Protocol):
    cache_dtype: torch.dtype

    def runs(self, rows: int) -> bool:
        """Whether this backend should decode `rows` rows (else the engine uses the reference)."""
        ...

    def decode(self, pool: KVPool, tokens: Tensor, positions: Tensor, tables: Tensor) -> Tensor:
        """One token per row: logits (B, V) float32 of the next token."""
        ...


def reference_step(
    model: GPT,
    pool: KVPool,
    tokens: Tensor,
    starts: Tensor,
    lengths: Tensor,
    tables: Tensor,
    n_logits: list[int] | None = None,
) -> Tensor:
    """Feed row b the tokens `tokens[b, :lengths[b]]` (B, T) at positions starts[b] onwards, writing
    their keys and values through block table `tables[b]` (B, W) and attending to the row's positions
    0 .. its own (its last `local_window` for banded layers).

    Logits float32: of each row's last real token (B, V), or with `n_logits` of each row's last
    n_logits[b] real tokens, concatenated in row order (sum(n_logits), V).
    """
    t, config = model.transformer, model.config
    device = t.wte.weight.device
    tokens, starts, lengths, tables = (x.to(device) for x in (tokens, starts, lengths, tables))
    B, T = tokens.shape
    C, nh, bs = config.n_embd, config.n_head, pool.block_size
    hs = C // nh
    steps = torch.arange(T, device=device)
    real = steps[None, :] < lengths[:, None]  # (B, T)
    positions = torch.where(real, starts[:, None] + steps[None, :], starts[:, None])  # padding: a valid id
    rows, cols = real.nonzero(as_tuple=True)
    p = positions[rows, cols]
    write_block, write_offset = tables[rows, p // bs], p % bs  # where each real token's key goes
    # Rows that start at position 0 attend only to their own new tokens: plain causal attention over
    # them is exact (right padding comes after every real query), flash / banded kernels included.
    fresh = bool((starts == 0).all())
    if not fresh:
        keys_at = torch.arange(tables.shape[1] * bs, device=device)
        dense = keys_at[None, None, :] <= positions[:, :, None]  # (B, T, W * bs)
        local = dense & (positions[:, :, None] - keys_at[None, None, :] < config.local_window)
        dense, local = dense[:, None], local[:, None]  # (B, 1, T, W * bs): one mask for every head
    x = t.wte(tokens) + t.wpe(positions)  # (B, T, C)
    for layer, block in enumerate(t.h):
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)
        k, v = k.view(B, T, nh, hs), v.view(B, T, nh, hs)
        k_cache, v_cache = pool.k[layer], pool.v[layer]  # (num_blocks, nh, bs, hs)
        k_cache[write_block, :, write_offset] = to_cache(k[rows, cols], k_cache)
        v_cache[write_block, :, write_offset] = to_cache(v[rows, cols], v_cache)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if fresh:
            y = attn.attend(q, k.transpose(1, 2), v.transpose(1, 2))
        else:
            W = tables.shape[1]
            keys = k_cache[tables].transpose(1, 2).reshape(B, nh, W * bs, hs).to(q.dtype)  # (B, nh, W * bs, hs)
            values = v_cache[tables].transpose(1, 2).reshape(B, nh, W * bs, hs).to(q.dtype)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=local if attn.local else dense)
        x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        x = x + block.mlp(block.ln_2(x))
    if n_logits is None:
        n_logits = [1] * B
    last = lengths.tolist()
    pick_rows = [b for b in range(B) for _ in range(n_logits[b])]
    pick_cols = [c for b in range(B) for c in range(last[b] - n_logits[b], last[b])]
    hidden = x[torch.tensor(pick_rows, device=device), torch.tensor(pick_cols, device=device)]  # (N, C)
    return model.logits(t.ln_f(hidden)).float()


class TorchStep:
    """The reference decoding step on torch's operators (any device, any weights); with compile=True,
    `torch.compile`d with dynamic shapes (batch and cache width change from step to step)."""

    def __init__(self, model: GPT, compile: bool = False) -> None:
        if compile and getattr(model, "quantized", None):
            raise ValueError("compile=True supports float32 / bfloat16 models, not int8 or packed layers")
        self.model = model
        self.cache_dtype = model.transformer.wte.weight.dtype
        self._step = torch.compile(reference_step, dynamic=True) if compile else reference_step

    def runs(self, rows: int) -> bool:
        return rows > 0

    def decode(self, pool: KVPool, tokens: Tensor, positions: Tensor, tables: Tensor) -> Tensor:
        B = tokens.shape[0]
        ones = torch.ones(B, dtype=torch.long)
        return self._step(self.model, pool, tokens.view(B, 1), positions.view(B), ones, tables)
