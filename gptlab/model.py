"""The GPT-2 / GPT-3 decoder-only Transformer.

Parameter names follow GPT-2's own (`wte`, `wpe`, `h`, `ln_1`, `c_attn`, `c_proj`, `ln_f`), so a
released checkpoint maps onto this module by renaming nothing and transposing the `Conv1D` weights.
The model knows nothing of files, ranks or devices beyond the tensors it is given.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.config import ModelConfig


def banded_causal_attention(q: Tensor, k: Tensor, v: Tensor, window: int, dropout_p: float = 0.0) -> Tensor:
    """Causal attention where each query sees only itself and the `window - 1` keys before it.

    Costs O(T * window) instead of O(T^2): the sequence is cut into blocks of `window` queries, and
    each block attends to its own block and the one before (2 * window keys), the band enforced by an
    additive mask inside that pair. q, k, v: (B, nh, T, hs).
    """
    B, nh, T, hs = q.shape
    w = window
    nb = -(-T // w)
    pad = nb * w - T
    if pad:  # tail padding: padded keys come after every real query, so the causal mask hides them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    q = q.reshape(B * nh, nb, w, hs)
    k = k.reshape(B * nh, nb, w, hs)
    v = v.reshape(B * nh, nb, w, hs)
    k2 = torch.cat([F.pad(k, (0, 0, 0, 0, 1, 0))[:, :-1], k], dim=2)  # (B*nh, nb, 2w, hs): previous + own
    v2 = torch.cat([F.pad(v, (0, 0, 0, 0, 1, 0))[:, :-1], v], dim=2)
    att = torch.matmul(q, k2.transpose(-1, -2)) * (1.0 / math.sqrt(hs))  # (B*nh, nb, w, 2w)
    att = (att + _band_bias(nb, w, att.device, att.dtype)).softmax(dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, dropout_p)
    y = torch.matmul(att, v2)  # (B*nh, nb, w, hs)
    return y.reshape(B, nh, nb * w, hs)[:, :, :T]


def _band_bias(nb: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(nb, w, 2w) additive mask: 0 where key j of a block pair lies in query i's band, else -inf."""
    i = torch.arange(w, device=device)[:, None]
    j = torch.arange(2 * w, device=device)[None, :]
    band = (j > i) & (j <= i + w)  # key j of the pair is `i + w - j` positions before query i
    bias = torch.zeros(nb, w, 2 * w, device=device, dtype=dtype)
    bias.masked_fill_(~band, float("-inf"))
    bias[0, :, :w] = float("-inf")  # block 0 has no previous block
    return bias


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        # The heads and width this module computes: a copy that holds a share of c_attn computes fewer.
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_size = config.n_embd // config.n_head
        self.layer = layer
        self.local = config.is_local(layer)
        self.window = config.local_window
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        hs = self.head_size
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        y = self.attend(q, k, v, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_embd)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
        """Causal attention of q over k, v (B, nh, T, hs), all from position 0: dense, or this layer's band."""
        if self.local and q.shape[2] > self.window:
            return banded_causal_attention(q, k, v, self.window, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_ff)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2, section 2.3)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_ctx, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
            )
        )
        # Tied embeddings use wte.weight directly in `logits`; no second module holds it, so meta-device
        # construction, `to_empty` and FSDP sharding can never silently untie it.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) and, given targets, the mean loss. Targets equal to -1 are ignored.

        The reference forward for training and scoring; cached decoding is `gptlab.infer`'s.
        """
        logits = self.logits(self.features(idx))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def logits(self, x: Tensor) -> Tensor:
        """Project final hidden states (…, C) onto the vocabulary."""
        if self.lm_head is not None:  # called as a module so gptlab.infer.quantize can swap in an int8 head
            return self.lm_head(x)
        return F.linear(x, self.transformer.wte.weight)

    def features(self, idx: Tensor) -> Tensor:
        """Final hidden states after ln_f, (B, T, C): what the LM head and task heads read."""
        self._check_input(idx)
        T = idx.shape[1]
        positions = torch.arange(T, device=idx.device).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def _check_input(self, idx: Tensor) -> None:
        if idx.dim() != 2:
            raise ValueError(f"input ids must have shape (batch, time), got {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input ids must be an integer tensor, got {idx.dtype}")
        T = idx.shape[1]
        if T > self.config.n_ctx:
            raise ValueError(
                f"sequence of {T} tokens exceeds the context of {self.config.n_ctx}; "
                "truncate the input or use a model with a longer context"
            )
        if torch.compiler.is_compiling() or idx.numel() == 0:
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.config.vocab_size}")

    # ---- sizing --------------------------------------------------------------------------------
    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
            if self.lm_head is not None:
                n -= self.lm_head.weight.numel()
        return n
