"""AdamW with weight decay on matrices only (GPT-3 recipe), over whichever parameters a task trains."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gptlab.train.config import OptimSection


def embedding_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}


def param_groups(model: nn.Module, params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decayed; biases, LayerNorm gains and embeddings not (GPT-3, following
    GPT-2's code; embeddings are lookups, so decaying them only shrinks rare tokens)."""
    embeddings = embedding_parameter_ids(model)
    decay, no_decay = [], []
    for _, p in params:
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_supported(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


def build_optimizer(
    model: nn.Module, params: Iterable[tuple[str, nn.Parameter]], cfg: OptimSection, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over `params` (name, parameter) pairs of `model` (which may be DDP/FSDP-wrapped)."""
    groups = [g for g in param_groups(model, params, cfg.weight_decay) if g["params"]]
    if not groups:
        raise ValueError("the task selected no trainable parameters (all have requires_grad=False)")
    fused = fused_supported(device) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
