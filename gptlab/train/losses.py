"""Cross-entropy and token log-probabilities over a large vocabulary without materialising the
(tokens, vocab) logits.

`linear_cross_entropy(hidden, weight, targets)` equals
`F.cross_entropy(F.linear(hidden, weight), targets, ignore_index=-1)` (fp32 rounding aside) but
computes logits a block of rows at a time and turns each block into its gradient in place, in the
forward pass: the same three matmuls, one logits-sized buffer per block instead of the logits,
log-probabilities and their gradients for the whole batch (4 x 400 MB at 2048 tokens x 50k vocab).
`linear_log_probs` gives each token's log-probability (DPO, RL), blockwise in both passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -1


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        block: int,
        grad_hidden_too: bool,
        grad_weight_too: bool,
    ) -> Tensor:
        N, C = hidden.shape
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        needs_grad = grad_hidden_too or grad_weight_too
        grad_hidden = torch.empty_like(hidden) if grad_hidden_too else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grad_weight_too else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, N, block):
            h = hidden[start : start + block]
            t = targets[start : start + block]
            ok = valid[start : start + block]
            logits = (h @ weight.t()).float()  # (b, V)
            safe_t = t.clamp(min=0)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            # One exp pass serves both the loss and its gradient (the block is memory-bound: a
            # logsumexp followed by a second exp for the softmax costs two more passes over it).
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: unnormalised softmax
            norm = probs.sum(dim=1)
            lse = norm.log() + top.squeeze(1)
            total += torch.where(ok, lse - picked, 0.0).sum()
            if not needs_grad:
                continue
            # d(sum of losses)/d logits = softmax - one_hot, zero for ignored rows; computed in place.
            probs.mul_((ok / norm)[:, None])
            probs.scatter_add_(1, safe_t[:, None], torch.where(ok, -1.0, 0.0)[:, None])
            probs = probs.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(probs, weight, out=grad_hidden[start : start + block])
            if grad_weight is not None:
                if probs.dtype == torch.float32:
                    grad_weight.addmm_(probs.t(), h)
                else:  # autocast: a bf16 / fp16 matmul, accumulated over blocks in fp32
                    grad_weight.add_(torch.mm(probs.t(), h))
        denom = count.clamp(min=1).to(torch.float32)
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
            denom,
        )
        ctx.weight_dtype = weight.dtype
        # Mean over counted tokens; NaN when every target is ignored, like F.cross_entropy.
        return total / count.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_hidden, grad_weight, denom = ctx.saved_tensors
        scale = grad_out / denom
        gh = (grad_hidden * scale).to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, block: int = 512) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (-1 = ignored).

    hidden (..., C), weight (V, C), targets (...) int64. Gradients are computed in the forward pass, so
    call it only for a loss you will backpropagate (or under no_grad, where it just computes the loss).
    """
    h, w, t = _rows(hidden, weight, targets)
    with torch.autocast(h.device.type, enabled=False):
        return _apply(h, w, t, block)


def _rows(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """hidden as (N, C) rows, targets as (N,); under autocast both matrices in its dtype (the blocks then
    run with autocast off, their fp32 accumulation explicit)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden rows but {t.shape[0]} targets")
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
        weight = weight.to(h.dtype)
    return h, weight, t


def _apply(h: Tensor, weight: Tensor, t: Tensor, block: int) -> Tensor:
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h, weight, t, block, grad and h.requires_grad, grad and weight.requires_grad)


def apply_fused_cross_entropy(model: torch.nn.Module, block: int = 512) -> None:
    """Make `model(idx, targets)` (a GPT) compute its loss with `linear_cross_entropy`, returning
    (None, loss): applied from outside, like activation checkpointing, on the instance, so parameter
    names, checkpoints and every other call (no targets, a KV cache, last_only) are unchanged."""
    plain = model.forward

    def forward(idx: Tensor, targets: Tensor | None = None, **kwargs):
        if targets is None or any(v is not None and v is not False for v in kwargs.values()):
            return plain(idx, targets, **kwargs)
        hidden = model.features(idx)  # (B, T, C)
        weight = model.transformer.wte.weight if model.lm_head is None else model.lm_head.weight
        return None, linear_cross_entropy(hidden, weight, targets, block)

    model.forward = forward


class _LinearLogProbs(torch.autograd.Function):
    """Per-row log-probability of the target under softmax(hidden @ weight.T), a block of rows at a time.

    Unlike the mean cross-entropy above, each row's log-probability gets its own upstream gradient (a
    sequence's advantage, a DPO pair's weight), unknown in the forward pass; so the forward keeps only
    each row's log-sum-exp and the backward recomputes one block of logits at a time.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, block: int) -> Tensor:  # type: ignore[override]
        N = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        out = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        lse_all = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        for start in range(0, N, block):
            logits = (hidden[start : start + block] @ weight.t()).float()  # (b, V)
            lse = torch.logsumexp(logits, dim=1)
            picked = logits.gather(1, safe[start : start + block, None]).squeeze(1)
            out[start : start + block] = torch.where(valid[start : start + block], picked - lse, 0.0)
            lse_all[start : start + block] = lse
        ctx.save_for_backward(hidden, weight, targets, lse_all)
        ctx.block = block
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        hidden, weight, targets, lse_all = ctx.saved_tensors
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        g = torch.where(valid, grad_out.float(), 0.0)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_h else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        for start in range(0, hidden.shape[0], ctx.block):
            h = hidden[start : start + ctx.block]
            gb = g[start : start + ctx.block]
            # d logp / d logits = one_hot(target) - softmax, scaled by the row's upstream gradient.
            grad_logits = (h @ weight.t()).float().sub_(lse_all[start : start + ctx.block, None]).exp_()
            grad_logits.mul_(-gb[:, None]).scatter_add_(1, safe[start : start + ctx.block, None], gb[:, None])
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[start : start + ctx.block])
            if grad_weight is not None:
                grad_weight.add_(torch.mm(grad_logits.t(), h).float())
        gw = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, gw, None, None


def linear_log_probs(hidden: Tensor, weight: Tensor, targets: Tensor, block: int = 512) -> Tensor:
    """log softmax(hidden @ weight.T)[target] per position, 0 where the target is -1.

    hidden (..., C), weight (V, C), targets (...) -> float32 (...). Equals
    `F.log_softmax(F.linear(hidden, weight).float(), -1).gather(-1, targets)` but holds at most `block`
    rows of logits at a time, in the forward and the backward pass: memory does not grow with
    tokens x vocabulary (a group of G samples per prompt in RL, chosen + rejected in DPO).
    """
    h, w, t = _rows(hidden, weight, targets)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearLogProbs.apply(h, w, t, block).reshape(targets.shape)


def apply_token_log_probs(model: torch.nn.Module, block: int = 512) -> None:
    """Make `model(idx, targets, log_probs=True)` (a GPT) return (None, per-token log-probs (B, T))
    through `linear_log_probs`: applied on the instance before DDP / FSDP wrap it, so their forward hooks
    (gradient sync) run; every other call is unchanged. Composes with `apply_fused_cross_entropy`."""
    plain = model.forward

    def forward(idx: Tensor, targets: Tensor | None = None, log_probs: bool = False, **kwargs):
        if not log_probs:
            return plain(idx, targets, **kwargs)
        if targets is None:
            raise ValueError("log_probs=True needs the targets whose log-probabilities to return")
        return None, token_log_probs(model, idx, targets, block)

    model.forward = forward


def token_log_probs(model: torch.nn.Module, idx: Tensor, targets: Tensor, block: int = 512) -> Tensor:
    """A GPT's log-probability of each target (B, T) float32, 0 where the target is -1, without its
    (B, T, vocab) logits. Call the model itself (after `apply_token_log_probs`) when it is wrapped."""
    hidden = model.features(idx)  # (B, T, C)
    weight = model.transformer.wte.weight if model.lm_head is None else model.lm_head.weight
    return linear_log_probs(hidden, weight, targets, block)
