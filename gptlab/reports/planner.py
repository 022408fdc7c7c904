"""`gptlab plan`: a parallel layout that fits each GPU, its memory by part, and the training time.

Tensor parallelism (`train.tensor_parallel`, with sequence parallelism) splits each block's weights and
activations over t GPUs of a node (t in 1, 2, 4, 8, dividing the heads); data parallelism with FSDP2
shards the weights, gradients and AdamW state that remain over the other GPUs (ZeRO-3). Embeddings are
not split by tensor parallelism, and the logits are whole on every rank. The planner takes the first
layout that fits, trying without activation checkpointing before with it (recomputing costs a third
more compute for sure; tensor parallelism costs communication within a node), the smallest t first,
and the largest micro-batch for it. Memory comes from `gptlab.reports.sizing.training_memory` (blocks'
activations divided by t, as Korthikanti et al. 2022 give for tensor + sequence parallelism), time from
`ModelConfig.training_flops`, with the forward counted twice under activation checkpointing
(Narayanan et al. 2021's 8 N D).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.config import ModelConfig
from gptlab.reports.sizing import accelerator, output_activation_bytes, training_memory

USABLE_MEMORY = 0.9
"""Share of a GPU's memory a plan may fill: the allocator's fragmentation and the CUDA context take the rest."""


@dataclass
class Plan:
    model: str
    gpu: str
    gpus: int
    data_parallel: int
    tensor_parallel: int
    micro_batch: int
    activation_checkpointing: bool
    seq_len: int
    global_batch: int
    tokens: float
    mfu: float
    memory: dict[str, float] = field(default_factory=dict)
    """Bytes per GPU: weights, gradients, optimizer, activations, total."""
    flops: float = 0.0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def days(self) -> float:
        return self.seconds / 86400

    def train_config(self, preset: str) -> dict[str, Any]:
        """The `gptlab train` settings this plan runs with (data section left to the user)."""
        return {
            "model": {"preset": preset},
            "data": {"seq_len": self.seq_len},
            "train": {
                "batch_size": self.global_batch,
                "micro_batch_size": self.micro_batch,
                "max_steps": max(1, round(self.tokens / (self.global_batch * self.seq_len))),
                "strategy": "fsdp",
                "tensor_parallel": self.tensor_parallel,
                "sequence_parallel": self.tensor_parallel > 1,
                "activation_checkpointing": self.activation_checkpointing,
                "checkpoint_format": "dcp",
                "dtype": "bfloat16",
                "device": "cuda",
            },
        }


def plan(
    config: ModelConfig,
    gpu: str,
    gpus: int,
    seq_len: int | None = None,
    global_batch: int = 1536,
    tokens: float = 300e9,
    mfu: float = 0.4,
    activation_checkpointing: bool | None = None,
    tensor_parallel: int | None = None,
) -> Plan:
    """The layout for training `config` on `gpus` GPUs of kind `gpu` (see gptlab.reports.sizing);
    `activation_checkpointing` and `tensor_parallel` fixed when given, else chosen."""
    acc = accelerator(gpu)
    seq = seq_len or config.n_ctx
    if seq > config.n_ctx:
        raise ValueError(f"--seq-len {seq} exceeds the model context {config.n_ctx}")
    if gpus < 1 or global_batch % gpus:
        raise ValueError(f"--global-batch {global_batch} must be a positive multiple of --gpus {gpus}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    sizes = tensor_parallel_sizes(config, gpus, global_batch)
    if tensor_parallel is not None:
        if tensor_parallel not in sizes:
            raise ValueError(
                f"--tensor-parallel {tensor_parallel} is not possible here; choose one of {sizes} (within a node of "
                f"{GPUS_PER_NODE}, dividing the heads, the MLP, the GPUs and the global batch's data-parallel split)"
            )
        sizes = [tensor_parallel]
    choices = [False, True] if activation_checkpointing is None else [activation_checkpointing]
    for checkpointing in choices:
        for tp in sizes:
            dp = gpus // tp
            local = global_batch // dp
            for micro in (m for m in range(local, 0, -1) if local % m == 0):
                memory = _per_gpu(config, dp, tp, micro, seq, checkpointing)
                if memory["total"] <= USABLE_MEMORY * acc.memory:
                    flops = config.training_flops(tokens, seq) * (4 / 3 if checkpointing else 1)
                    seconds = flops / (gpus * acc.peak_flops * mfu)
                    return Plan(
                        config.name, acc.name, gpus, dp, tp, micro, checkpointing, seq, global_batch, tokens, mfu,
                        memory, flops, seconds,
                    )  # fmt: skip
    tp = max(sizes)
    need = _per_gpu(config, gpus // tp, tp, 1, seq, True)["total"]
    raise ValueError(
        f"{config.name} does not fit {gpus} x {acc.name} ({acc.memory / 1e9:.0f} GB) even at micro-batch 1 "
        f"with activation checkpointing and tensor parallel {tp}: {need / 1e9:.1f} GB per GPU; use more GPUs "
        "or a shorter --seq-len"
    )


GPUS_PER_NODE = 8
"""Tensor parallelism stays within a node: its all-reduces run every layer and need NVLink bandwidth."""


def tensor_parallel_sizes(config: ModelConfig, gpus: int, global_batch: int) -> list[int]:
    """Tensor-parallel sizes a run can use: within a node, dividing the heads, the MLP and the GPUs, and
    leaving a data-parallel size that divides the global batch."""
    sizes = []
    for tp in (1, 2, 4, GPUS_PER_NODE):
        if tp > gpus or gpus % tp or config.n_head % tp or config.d_ff % tp or global_batch % (gpus // tp):
            continue
        sizes.append(tp)
    return sizes


def _per_gpu(config: ModelConfig, dp: int, tp: int, micro: int, seq: int, checkpointing: bool) -> dict[str, float]:
    whole = training_memory(config, micro, seq, checkpointing)
    n, blocks = config.n_params(), config.n_params(embeddings=False)
    share = (blocks / tp + n - blocks) / n / dp  # tensor parallelism splits the blocks, FSDP everything
    parts = {k: whole[k] * share for k in ("weights", "gradients", "optimizer")}
    output = output_activation_bytes(config, micro, seq)
    parts["activations"] = (whole["activations"] - output) / tp + output
    parts["total"] = sum(parts.values())
    return parts


def format_plan(p: Plan) -> str:
    gb = 1e9
    lines = [
        f"{p.model} on {p.gpus} x {p.gpu}: data parallel {p.data_parallel} (FSDP2), tensor parallel "
        f"{p.tensor_parallel}, micro-batch {p.micro_batch}, activation checkpointing "
        f"{'on' if p.activation_checkpointing else 'off'}, sequence {p.seq_len}, global batch {p.global_batch}",
        "memory per GPU: "
        + ", ".join(f"{k} {v / gb:.2f} GB" for k, v in p.memory.items() if k != "total")
        + f"; total {p.memory['total'] / gb:.2f} GB",
        f"{p.tokens:.3g} tokens, {p.flops:.3g} FLOPs: {p.tokens_per_s:,.0f} tokens/s and {p.days:.2f} days "
        f"at {100 * p.mfu:.0f}% MFU",
    ]
    return "\n".join(lines)


def write_plan_config(p: Plan, preset: str, out: str | Path) -> Path:
    import json

    from gptlab.checkpoint import atomic_write_text

    out = Path(out)
    atomic_write_text(out, json.dumps(p.train_config(preset), indent=2) + "\n")
    return out
