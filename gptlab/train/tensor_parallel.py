"""Tensor parallelism (Megatron-LM's layout, with `torch.distributed.tensor.parallel`) applied to the GPT's
blocks from outside the model, and the state-dict layout that lets checkpoints move between layouts.

`train.tensor_parallel = N` splits each block over N consecutive ranks: `c_attn` and `c_fc` column-wise,
the two `c_proj` row-wise, so a block costs one all-reduce in the forward after attention and one after
the MLP (and as many in the backward). Attention heads are split by groups: rank r computes heads
[r * nh / N, (r + 1) * nh / N). The rest of the world size is data parallel, FSDP2 on the mesh's "dp"
dimension. `train.sequence_parallel` also splits the layer norms, dropout and residual stream along the
sequence (all-gather before attention and MLP, reduce-scatter after).

c_attn is one Linear whose output rows are [q; k; v]. A column-wise shard of those rows would give rank 0
all of q and half of k, so the rows are first reordered by head group, [q_0; k_0; v_0; q_1; k_1; v_1; ...]
(q_r: rank r's heads), and then sharded evenly. The parameters therefore live in that order while
training; every state dict that leaves the process is put back in GPT-2's order (`canonical`), so
single-file checkpoints, conversions and exports never see the difference. Sharded (DCP) checkpoints store
c_attn's weight as a (3, C, C_in) view, in which every rank's shard is one box whatever the layout (the
data-parallel shard is on the input dimension), and its bias whole.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

QKV_WEIGHT = "attn.c_attn.weight"
QKV_BIAS = "attn.c_attn.bias"


def setup_mesh(d: Any, tensor_parallel: int) -> None:
    """Give `d` (a gptlab.train.distributed.Dist) its ("dp", "tp") DeviceMesh for `tensor_parallel` > 1
    (none for 1: plain data parallelism)."""
    d.tensor_parallel, d.mesh = 1, None
    if tensor_parallel == 1:
        return
    if d.world_size < tensor_parallel:
        raise ValueError(
            f"train.tensor_parallel = {tensor_parallel} needs at least {tensor_parallel} processes, this run has "
            f"{d.world_size}; launch with torchrun --nproc_per_node {tensor_parallel} (or a multiple), or pass "
            "--train.tensor_parallel 1 --train.sequence_parallel false (checkpoints resume under any layout)"
        )
    if d.world_size % tensor_parallel:
        raise ValueError(
            f"train.tensor_parallel = {tensor_parallel} does not divide the {d.world_size} processes; launch a "
            f"multiple of {tensor_parallel} with torchrun --nproc_per_node (the rest is data parallel)"
        )
    import logging

    from torch.distributed.device_mesh import init_device_mesh

    # Gathering an FSDP shard of a tensor-parallel shard (a whole-state checkpoint) takes two all-gathers;
    # torch warns about it once per tensor, which is noise here.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    d.tensor_parallel = tensor_parallel
    shape = (d.world_size // tensor_parallel, tensor_parallel)
    d.mesh = init_device_mesh(d.device.type, shape, mesh_dim_names=("dp", "tp"))


def check_model(config: Any, tensor_parallel: int) -> None:
    """Refuse, with what to change, a model whose heads or widths the tensor-parallel size does not divide."""
    for what, n in (("model.n_head", config.n_head), ("the MLP width (model.n_inner)", config.d_ff)):
        if n % tensor_parallel:
            raise ValueError(
                f"train.tensor_parallel = {tensor_parallel} must divide {what} = {n}; pick a size that divides it"
            )


def qkv_order(n_embd: int, tensor_parallel: int, device: torch.device | None = None) -> Tensor:
    """Row indices that reorder c_attn's [q; k; v] rows into head groups: grouped = canonical[order]."""
    share = n_embd // tensor_parallel
    idx = torch.arange(3 * n_embd, device=device).view(3, tensor_parallel, share)  # (part, group, row)
    return idx.transpose(0, 1).reshape(-1)


def parallelize(model: nn.Module, d: Any, sequence_parallel: bool = False) -> None:
    """Shard every block of `model` over the mesh's "tp" dimension, in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    if not hasattr(model, "transformer"):
        raise ValueError(
            f"train.tensor_parallel splits a GPT language model's blocks, not a {type(model).__name__}; "
            "use data parallelism (train.strategy) for this task"
        )
    tp = d.tensor_parallel
    mesh = d.mesh["tp"]
    config = model.config
    check_model(config, tp)
    seq = Shard(1)
    for block in model.transformer.h:
        attn = block.attn
        if type(attn.c_attn) is not nn.Linear or type(block.mlp.c_fc) is not nn.Linear:
            raise ValueError("train.tensor_parallel shards plain Linear layers; it does not combine with LoRA adapters")
        with torch.no_grad():
            for p in (attn.c_attn.weight, attn.c_attn.bias):
                p.copy_(canonical(p, config.n_embd, tp, inverse=True))
        attn.n_head //= tp
        attn.n_embd //= tp
        out = seq if sequence_parallel else Replicate()
        plan: dict[str, Any] = {
            "attn.c_attn": ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(output_layouts=out),
            "mlp.c_fc": ColwiseParallel(),
            "mlp.c_proj": RowwiseParallel(output_layouts=out),
        }
        if sequence_parallel:
            gather = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
            plan.update({"ln_1": SequenceParallel(), "ln_2": SequenceParallel(), "attn": gather, "mlp": gather})
        parallelize_module(block, mesh, plan)
    if sequence_parallel:
        blocks = model.transformer.h
        enter = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(seq,), use_local_output=True)
        leave = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),), use_local_output=True)
        blocks[0].register_forward_pre_hook(_divisible_sequence(tp))
        parallelize_module(blocks[0], mesh, enter)
        parallelize_module(model.transformer.ln_f, mesh, leave)


def _divisible_sequence(tp: int) -> Any:
    def check(_module: nn.Module, args: tuple) -> None:
        T = args[0].shape[1]
        if T % tp:
            raise ValueError(
                f"train.sequence_parallel splits the sequence over {tp} ranks, but a batch has {T} positions; use a "
                f"data.seq_len (and evaluation lengths) divisible by {tp}, or turn sequence parallelism off"
            )

    return check


def fsdp_placement_fn(model: nn.Module) -> Any:
    """FSDP2's `shard_placement_fn`: c_attn weights sharded on their input dimension (so each rank's rows
    stay whole [q; k; v] groups, see the module docstring), every other parameter on dimension 0."""
    from torch.distributed.tensor import Shard

    qkv = {id(p) for name, p in model.named_parameters() if name.endswith(QKV_WEIGHT)}

    def place(param: nn.Parameter) -> Any:
        return Shard(1) if id(param) in qkv else Shard(0)

    return place


def qkv_layout(model: nn.Module) -> tuple[int, int]:
    """(n_embd, tensor-parallel size) as `model`'s attention modules run it; (0, 1) without attention."""
    for module in model.modules():
        if hasattr(module, "c_attn") and hasattr(module, "head_size"):
            n_embd = module.c_attn.weight.shape[0] // 3  # the global shape, also for a DTensor
            return n_embd, n_embd // module.head_size // module.n_head
    return 0, 1


# ---- state-dict layouts ---------------------------------------------------------------------------
def _is_qkv(key: str) -> bool:
    return key.endswith((QKV_WEIGHT, QKV_BIAS))


def canonical(tensor: Tensor, n_embd: int, tensor_parallel: int, inverse: bool = False) -> Tensor:
    """A whole c_attn weight / bias (or optimizer moment) from head-group order to GPT-2's [q; k; v]
    (`inverse`: the other way)."""
    order = qkv_order(n_embd, tensor_parallel, tensor.device)
    if inverse:
        return tensor[order]
    out = torch.empty_like(tensor)
    out[order] = tensor
    return out


def map_full_state(
    model_sd: dict[str, Tensor], optim_sd: dict[str, Any] | None, n_embd: int, tensor_parallel: int, inverse: bool
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Whole (gathered) model and optimizer state dicts reordered to GPT-2's order, or back (`inverse`)."""
    if tensor_parallel == 1:
        return model_sd, optim_sd

    def order(_key: str, _slot: str | None, t: Tensor) -> Tensor:
        return canonical(t, n_embd, tensor_parallel, inverse)

    return _each_qkv(model_sd, order), None if optim_sd is None else _each_qkv(optim_sd, order)


def _each_qkv(state: dict[str, Any], fn: Any) -> dict[str, Any]:
    """`state` (a model state dict, or an optimizer one with "state") with fn(key, slot, tensor) applied
    to c_attn's weight and bias (slot None) and to their optimizer slots (exp_avg, ...; not the step)."""
    out = dict(state)
    for key in [k for k in out if _is_qkv(k)]:
        out[key] = fn(key, None, out[key])
    if "state" in out:
        out["state"] = {
            key: {
                name: fn(key, name, t) if _is_qkv(key) and isinstance(t, Tensor) and t.dim() else t
                for name, t in slots.items()
            }
            for key, slots in out["state"].items()
        }
    return out


def to_storage(state: dict[str, Any], n_embd: int, tensor_parallel: int) -> dict[str, Any]:
    """The DCP form of a (sharded) model / optimizer state: c_attn weights as (3, C, C_in) views of each
    rank's shard, c_attn biases whole and in GPT-2's order. Other entries unchanged."""
    return _each_qkv(state, lambda key, _, t: _stored(t, key.endswith(QKV_WEIGHT), n_embd, tensor_parallel))


def from_storage(stored: dict[str, Any], like: dict[str, Any], n_embd: int, tensor_parallel: int) -> dict[str, Any]:
    """Undo `to_storage` after DCP loaded into it: entries shaped and placed as in `like` (the state the
    model and optimizer produced before loading)."""

    def restore(key: str, slot: str | None, t: Tensor) -> Tensor:
        return _restored(t, like[key] if slot is None else like["state"][key][slot], n_embd, tensor_parallel)

    return _each_qkv(stored, restore)


def _stored(t: Tensor, is_weight: bool, n_embd: int, tp: int) -> Tensor:
    from torch.distributed.tensor import DTensor, Shard

    if not is_weight:  # a bias: whole, every rank the same (DCP writes it once)
        whole = t.full_tensor() if isinstance(t, DTensor) else t
        return canonical(whole, n_embd, tp) if tp > 1 else whole
    if not isinstance(t, DTensor):
        return t.view(3, n_embd, t.shape[1])
    local = t.to_local()
    placements = []
    for p in t.placements:
        if isinstance(p, Shard) and p.dim == 0:
            placements.append(Shard(1))  # the tensor-parallel shard: each rank holds whole [q; k; v] groups
        elif isinstance(p, Shard) and p.dim == 1:
            placements.append(Shard(2))
        else:
            placements.append(p)
    view = local.view(3, local.shape[0] // 3, local.shape[1])
    return DTensor.from_local(
        view,
        t.device_mesh,
        placements,
        run_check=False,
        shape=(3, n_embd, t.shape[1]),
        stride=(n_embd * t.shape[1], t.shape[1], 1),
    )


def _restored(t: Tensor, like: Tensor, n_embd: int, tp: int) -> Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if t.dim() == 1:  # a whole canonical bias
        whole = canonical(t, n_embd, tp, inverse=True) if tp > 1 else t
        if isinstance(like, DTensor):
            return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)
        return whole
    if isinstance(t, DTensor):  # a copy: DCP loaded into views of the live tensors, which are then set from it
        local = t.to_local().reshape(-1, t.to_local().shape[2]).clone()
        return DTensor.from_local(
            local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
        )
    return t.reshape(3 * n_embd, t.shape[2]).clone()
