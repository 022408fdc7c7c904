"""Process group, device, and the wrappers applied to the model from outside (DDP, FSDP2, activation
checkpointing, compile); full state dicts for checkpoints.

Launch: `torchrun --nproc_per_node N -m gptlab train ...` on one machine. Several machines: run on each
`torchrun --nnodes M --nproc_per_node N --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500
-m gptlab train ...` with the same HOST (node 0's address) everywhere; the run directory must be on
storage every node sees (rank 0 writes, every rank reads on resume). Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False
    tensor_parallel: int = 1
    """Ranks that share one model replica by tensor parallelism (consecutive ranks, the mesh's inner
    dimension); the world size divided by it is the data-parallel size."""
    mesh: Any = None
    """The ("dp", "tp") DeviceMesh once tensor parallelism is set up; None otherwise."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Model replicas: the ranks that read different data."""
        return self.world_size // self.tensor_parallel

    @property
    def dp_rank(self) -> int:
        """Which replica this rank belongs to (ranks of one tensor-parallel group read the same data)."""
        return self.rank // self.tensor_parallel

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device is {name!r} but CUDA is not available; use train.device=cpu")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size <= 1:
        return Dist(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    here = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        here = True
    return Dist(rank, world_size, local_rank, dev, here)


def shutdown(d: Dist) -> None:
    if d.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_object(d: Dist, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ---- wrappers applied from outside the model ---------------------------------------------------
def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every Transformer block in the backward pass.

    Each block's `forward` is replaced on the instance, so parameter names (and checkpoints) are
    unchanged. Only passes with gradients recompute; inference runs the plain forward.
    """
    from torch.utils.checkpoint import checkpoint

    for block in _blocks(model):
        plain = block.forward

        @functools.wraps(plain)
        def forward(x, _plain=plain):
            if torch.is_grad_enabled():
                return checkpoint(_plain, x, use_reentrant=False)
            return _plain(x)

        block.forward = forward


def _blocks(model: nn.Module) -> list[nn.Module]:
    h = getattr(getattr(model, "transformer", None), "h", None)
    if h is None:
        raise ValueError(f"{type(model).__name__} has no transformer.h blocks to wrap")
    return list(h)


def wrap_model(model: nn.Module, strategy: str, d: Dist) -> nn.Module:
    """DDP or FSDP2 (`fully_shard` on every block, then the root) over `model`; alone: unchanged.
    Beside tensor parallelism (already applied), data parallelism is FSDP2 on the mesh's "dp" dimension,
    also when that has one rank: every parameter is then a DTensor, which one fused optimizer step needs."""
    mesh = None
    if d.tensor_parallel > 1:
        strategy, mesh = "fsdp", d.mesh["dp"]
    elif not d.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from gptlab.train.tensor_parallel import fsdp_placement_fn

        place = fsdp_placement_fn(model)
        for block in _blocks(model):
            fully_shard(block, mesh=mesh, shard_placement_fn=place)
        fully_shard(model, mesh=mesh, shard_placement_fn=place)
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [d.device.index] if d.device.type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    raise ValueError(f"train.strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside DDP / torch.compile wrappers (FSDP2 shards in place: the module itself)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if enabled:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so their global 2-norm is at most `max_norm`; the norm before. Gradients may
    be DTensors on different meshes (FSDP2's "dp" beside tensor parallelism's 2-D one), which one
    `clip_grad_norm_` cannot stack: each mesh's norm is reduced on its own, then combined."""
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(getattr(g, "device_mesh", None), []).append(g)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        squares.append(float(norm) ** 2)
    total = math.sqrt(sum(squares))
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for group in groups.values():
            torch._foreach_mul_(group, scale)
    return total


def optimizers_of(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers inside a container of several (Muon + AdamW), or the one given."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


# ---- full state dicts (every rank calls; rank 0 gets the tensors) ------------------------------
def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, d: Dist
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Unsharded CPU model and optimizer state dicts keyed by parameter name (no wrapper prefixes).
    A collective under FSDP: every rank must call it; only rank 0's result holds tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from gptlab.train.tensor_parallel import map_full_state, qkv_layout

    opts = _options(cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = None
    if optimizer is not None:
        optim_sd = get_optimizer_state_dict(model, optimizers_of(optimizer), options=opts)
    if d.is_main:
        model_sd, optim_sd = map_full_state(model_sd, optim_sd, *qkv_layout(model), inverse=False)
    return model_sd, optim_sd


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: dict[str, torch.Tensor],
    optim_sd: dict[str, Any] | None,
    d: Dist,
) -> None:
    """Load full state dicts; distributed, rank 0's copy is broadcast (other ranks may pass empty)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from gptlab.train.tensor_parallel import map_full_state, qkv_layout

    if d.is_main:
        model_sd, optim_sd = map_full_state(model_sd, optim_sd, *qkv_layout(model), inverse=True)
    opts = _options(broadcast_from_rank0=d.enabled)
    set_model_state_dict(model, model_sd, options=opts)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizers_of(optimizer), optim_sd, options=opts)
