"""AdamW with weight decay on matrices only (GPT-3 recipe), or Muon for the blocks' matrices with AdamW
for the rest, over whichever parameters a task trains."""

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


class Optimizers:
    """Several optimizers stepped as one (Muon + AdamW): the loop sees one `param_groups` list; state
    dicts go through `gptlab.train.distributed.optimizers_of`."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def is_muon_parameter(name: str, p: nn.Parameter) -> bool:
    """A 2-D weight matrix inside a Transformer block (not an embedding, the head, a norm or a bias)."""
    return p.dim() == 2 and ".h." in f".{name}"


def build_optimizer(
    model: nn.Module, params: Iterable[tuple[str, nn.Parameter]], cfg: OptimSection, device: torch.device
) -> torch.optim.Optimizer | Optimizers:
    """AdamW (or Muon + AdamW) over `params` (name, parameter) pairs of `model` (may be DDP/FSDP-wrapped)."""
    params = list(params)
    if cfg.name == "muon":
        matrices = [p for n, p in params if p.requires_grad and is_muon_parameter(n, p)]
        rest = [(n, p) for n, p in params if not (p.requires_grad and is_muon_parameter(n, p))]
        # lr_scale: set_lr applies the schedule's factor to Muon's own peak.
        muon = torch.optim.Muon(
            [{"params": matrices, "lr_scale": cfg.muon_lr / cfg.lr}],
            lr=cfg.muon_lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
        )
        return Optimizers([muon, _adamw(model, rest, cfg, device)]) if matrices else _adamw(model, rest, cfg, device)
    return _adamw(model, params, cfg, device)


def _adamw(
    model: nn.Module, params: Iterable[tuple[str, nn.Parameter]], cfg: OptimSection, device: torch.device
) -> torch.optim.AdamW:
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
