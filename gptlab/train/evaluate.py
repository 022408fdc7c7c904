"""Validation inside the loop: the mixed-precision setting and the token-weighted validation loss that
scores the same sequences whatever the world size or micro-batch."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from gptlab.train import distributed as D
from gptlab.train.task import Task, batch_rows, row_slice, split_rows, to_device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # Autocast on a CPU without bf16 instructions emulates it, slower than fp32.
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    batches: list[Any],
    d: D.Dist,
    dtype: torch.dtype,
    micro_batch_size: int | None = None,
) -> float:
    """Token-weighted mean loss over `batches`. Each batch is split by rows across the data-parallel
    ranks, and each rank's rows into forward passes of `micro_batch_size`, so the same sequences are
    scored whatever the world size or micro-batch. Every rank runs the same number of forward passes
    (FSDP needs all of them in each); a rank short of rows repeats a row at weight zero."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=d.device)
    for batch in batches:
        rows = batch_rows(batch)
        mine = split_rows(batch, d.dp_rank, d.dp_size)
        most = -(-rows // d.dp_size)  # the largest rank's share
        micro = micro_batch_size or most
        for k in range(-(-most // micro)):
            part = row_slice(mine, k * micro, (k + 1) * micro)
            empty = batch_rows(part) == 0
            part = to_device(row_slice(batch, 0, 1) if empty else part, d.device)
            with autocast(d.device, dtype):
                loss = task.loss(model, part)
            if not empty:
                n = task.tokens(part)
                total[0] += float(loss) * n
                total[1] += n
    # Tensor-parallel ranks repeat their group's rows: numerator and denominator scale alike.
    D.all_reduce_sum(d, total)
    model.train(was_training)
    return float(total[0] / total[1])
