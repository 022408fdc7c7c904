"""The KV-cached decoder: prefill left-padded prompts once, then one token per row per step.

`Decoder.step` runs `decode_step`, a lean copy of `GPT.forward` for one new token per row (no input
checks, keys and values written straight into the preallocated cache, logits of that token only); the
tests hold it to the full forward token for token. With compile=True it is `torch.compile`d over a fixed
cache shape. A model prepared for gptlab's CPU kernels (`generate.prepare_model`) carries a
`cpu_decode_step` that runs the same step in one C call, used whenever it takes the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gptlab.model import GPT, KVCache, kv_cache_dtype, to_cache


class Decoder:
    """Runs `model` over a preallocated KV cache: `prefill` once, then `step` one token per row.

    With compile=True the step is `torch.compile`d over a fixed cache shape (the write slot is a
    tensor, attention spans the whole cache under a mask), so one graph serves every step.
    """

    def __init__(self, model: GPT, batch_size: int, max_len: int, *, compile: bool = False) -> None:
        self.model = model
        wte = model.transformer.wte.weight
        if compile:
            max_len = min(bucket(max_len), max(max_len, model.config.n_ctx))
        dtype = wte.dtype if compile else kv_cache_dtype(model, batch_size)
        self.cache = KVCache(model.config, batch_size, max_len, device=wte.device, dtype=dtype)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=wte.device)  # next position
        self.padded = False
        self._step = _compiled_step(model) if compile else None

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> Tensor:
        """Left-pad `prompts` into the cache; logits (B, V) float32 of each prompt's last token."""
        cache = self.cache
        if cache.length:
            raise ValueError("prefill needs an empty cache; build a new Decoder per run")
        T = max(len(p) for p in prompts)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (start empty prompts with <|endoftext|>)")
        device = self.positions.device
        idx = torch.zeros(len(prompts), T, dtype=torch.long)
        positions = torch.zeros(len(prompts), T, dtype=torch.long)
        for b, p in enumerate(prompts):
            pad = T - len(p)
            idx[b, pad:] = torch.as_tensor(p, dtype=torch.long)
            positions[b, pad:] = torch.arange(len(p))
            cache.valid[b, :pad] = False
            self.padded |= pad > 0
        self.positions = torch.tensor([[len(p)] for p in prompts], device=device)
        logits, _ = self.model(idx.to(device), cache=cache, positions=positions.to(device), last_only=True)
        return logits[:, -1].float()

    @torch.inference_mode()
    def step(self, ids: Tensor) -> Tensor:
        """Feed one token per row (B,); logits (B, V) float32 of the next token."""
        cache = self.cache
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} slots is full")
        idx = ids.view(-1, 1).to(self.positions.device)
        fused = getattr(self.model, "cpu_decode_step", None)
        if self._step is not None:
            slot = torch.tensor(cache.length, device=idx.device)
            logits = self._step(idx, self.positions, slot, cache.k, cache.v, cache.valid)
        elif fused is not None and fused.accepts(idx.shape[0], cache.k):
            slots = torch.full((idx.shape[0],), cache.length, dtype=torch.long)
            logits = fused(idx, self.positions, slots, cache.k, cache.v, cache.valid if self.padded else None)
        else:
            logits = decode_step(
                self.model,
                idx,
                self.positions,
                cache.length,
                cache.k,
                cache.v,
                cache.valid if self.padded else None,
            )
        cache.length += 1
        self.positions += 1
        return logits.float()

    @torch.inference_mode()
    def reorder(self, index: Tensor) -> None:
        """Keep (or repeat) rows `index` of the batch: n samples per prompt, beam search."""
        index = index.to(self.positions.device)
        self.cache.reorder(index)
        self.positions = self.positions.index_select(0, index)


def decode_step(
    model: GPT,
    idx: Tensor,
    positions: Tensor,
    slot: int | Tensor,
    k_all: Tensor,
    v_all: Tensor,
    valid: Tensor | None,
) -> Tensor:
    """One token per row through every block, writing its keys and values into cache slot `slot`.

    `slot` an int: attend to slots [0, slot] (eager). `slot` a 0-d tensor: attend to the whole cache
    under a mask, so the shapes never change (compiled). `valid` (B, L) masks left padding, or None.
    Logits (B, V) in the model's dtype. Same maths as `GPT.forward` with a cache, minus its checks.
    """
    t = model.transformer
    config = model.config
    B, C, nh = idx.shape[0], config.n_embd, config.n_head
    x = t.wte(idx) + t.wpe(positions)  # (B, 1, C)
    static = isinstance(slot, Tensor)
    if static:
        s = torch.arange(k_all.shape[3], device=idx.device)
        dense = (s <= slot) & valid[:, None, None, :]  # (B, 1, 1, L)
        local = dense & (slot - s < config.local_window)
        index = slot.view(1)
    else:
        end = slot + 1
        lo_local = max(0, end - config.local_window)
        dense = None if valid is None else valid[:, None, None, :end]
        local = None if valid is None else valid[:, None, None, lo_local:end]
        # Views made once per step, not per layer: the write slot and the attended span of every layer.
        k_new, v_new = k_all[:, :, :, slot], v_all[:, :, :, slot]  # (n_layer, B, nh, hs)
        k_dense, v_dense = k_all[:, :, :, :end], v_all[:, :, :, :end]  # (n_layer, B, nh, end, hs)
        k_local, v_local = k_all[:, :, :, lo_local:end], v_all[:, :, :, lo_local:end]
    hs = C // nh
    for layer, block in enumerate(t.h):
        attn, mlp, ln_1, ln_2 = block.attn, block.mlp, block.ln_1, block.ln_2
        # One new token per row: (B, 1, 3C) is already laid out as (B, 3, nh, hs), no transposes.
        h = F.layer_norm(x, (C,), ln_1.weight, ln_1.bias, ln_1.eps)
        q, k, v = attn.c_attn(h).view(B, 3, nh, hs).unbind(1)  # (B, nh, hs) each
        if static:
            keys = k_all[layer].index_copy_(2, index, k.unsqueeze(2))  # (B, nh, L, hs)
            values = v_all[layer].index_copy_(2, index, v.unsqueeze(2))
        else:
            k_new[layer].copy_(to_cache(k, k_new))
            v_new[layer].copy_(to_cache(v, v_new))
            keys, values = (k_local[layer], v_local[layer]) if attn.local else (k_dense[layer], v_dense[layer])
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        y = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=local if attn.local else dense)
        x = x + attn.c_proj(y.reshape(B, 1, C))  # (B, nh, 1, hs) -> (B, 1, C): a view for one token
        h = F.layer_norm(x, (C,), ln_2.weight, ln_2.bias, ln_2.eps)
        x = x + mlp.c_proj(F.gelu(mlp.c_fc(h), approximate="tanh"))
    return model.logits(t.ln_f(x))[:, -1]


def _compiled_step(model: GPT) -> Callable[..., Tensor]:
    """`torch.compile` of the static decode step, kept on the model so later runs reuse its graphs."""
    if getattr(model, "quantized", None):
        raise ValueError("compile=True supports float32 / bfloat16 models, not int8 or packed half layers")
    step = model.__dict__.get("_gptlab_decode_step")
    if step is None:

        def decode(idx: Tensor, positions: Tensor, slot: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
            return decode_step(model, idx, positions, slot, k, v, valid)

        step = torch.compile(decode, dynamic=False, fullgraph=True)
        model.__dict__["_gptlab_decode_step"] = step
    return step


def bucket(n: int, multiple: int = 64) -> int:
    """Round a cache length up so compiled graphs are reused across runs of similar length."""
    return int(math.ceil(n / multiple) * multiple)
