"""Sizing beyond the model's own formulas: memory for training, accelerators, time and token budgets.

Parameter counts, FLOPs per token and KV-cache bytes are `ModelConfig` methods (one formula, one
place); this module adds what needs a training setup or a piece of hardware on top of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gptlab.config import ModelConfig

BYTES_PER_VALUE = {"fp32": 4, "bf16": 2, "int8": 1}

# Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", Table 3): compute-optimal
# models see about 20 tokens per parameter (total parameters, embeddings included).
CHINCHILLA_TOKENS_PER_PARAM = 20

# AdamW in mixed precision as torch.autocast runs it: fp32 weights (4 bytes), fp32 gradients (4) and
# two fp32 moments (8); 16 bytes per parameter before activations (Rajbhandari et al. 2020, ZeRO, 3.1
# count 16 bytes too, with bf16 weights + grads and an fp32 master copy instead).
TRAIN_WEIGHT_BYTES = 4
TRAIN_GRAD_BYTES = 4
ADAMW_STATE_BYTES = 8


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float
    """Peak dense (no sparsity) bf16 tensor FLOP/s; fp16 where the chip has no bf16 (V100, T4)."""
    bandwidth: float
    """Memory bandwidth, bytes/s."""
    memory: float
    """Memory capacity, bytes."""
    source: str
    peak_flops_fp32: float = 0.0
    """Peak dense fp32 FLOP/s without tensor cores (training MFU in fp32); 0: unknown."""


# Vendor datasheets; dense figures (the datasheets' "with sparsity" numbers are twice these).
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        # NVIDIA Tesla V100 datasheet (SXM2): 125 TFLOPS fp16 tensor, 900 GB/s HBM2, 32 GB.
        Accelerator("V100", 125e12, 900e9, 32e9, "NVIDIA V100 datasheet (SXM2, fp16 tensor)", 15.7e12),
        # NVIDIA T4 datasheet: 65 TFLOPS fp16 mixed precision, 320 GB/s GDDR6, 16 GB.
        Accelerator("T4", 65e12, 320e9, 16e9, "NVIDIA T4 datasheet (fp16 tensor)", 8.1e12),
        # NVIDIA L4 datasheet: 242 TFLOPS bf16 with sparsity -> 121 dense, 300 GB/s, 24 GB.
        Accelerator("L4", 121e12, 300e9, 24e9, "NVIDIA L4 datasheet", 30.3e12),
        # NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: 165.2 TFLOPS bf16 tensor with
        # fp32 accumulate (dense), 1008 GB/s GDDR6X, 24 GB.
        Accelerator("RTX4090", 165.2e12, 1008e9, 24e9, "NVIDIA Ada Lovelace whitepaper (RTX 4090)", 82.6e12),
        # NVIDIA A100 datasheet: 312 TFLOPS bf16 dense; 40 GB SXM 1555 GB/s, 80 GB SXM 2039 GB/s.
        Accelerator("A100-40GB", 312e12, 1.555e12, 40e9, "NVIDIA A100 datasheet (40GB SXM)", 19.5e12),
        Accelerator("A100", 312e12, 2.039e12, 80e9, "NVIDIA A100 datasheet (80GB SXM)", 19.5e12),
        # NVIDIA H100 datasheet: SXM 989 TFLOPS bf16 dense, 3.35 TB/s; PCIe 756 TFLOPS, 2.0 TB/s; 80 GB.
        Accelerator("H100", 989e12, 3.35e12, 80e9, "NVIDIA H100 datasheet (SXM)", 67e12),
        Accelerator("H100-PCIE", 756e12, 2.0e12, 80e9, "NVIDIA H100 datasheet (PCIe)", 51e12),
        # NVIDIA H200 datasheet (SXM): H100's compute, 141 GB HBM3e at 4.8 TB/s.
        Accelerator("H200", 989e12, 4.8e12, 141e9, "NVIDIA H200 datasheet (SXM)", 67e12),
        # NVIDIA A10 datasheet (AWS's A10G is its variant): 125 TFLOPS bf16 dense, 31.2 fp32, 600 GB/s, 24 GB.
        Accelerator("A10G", 125e12, 600e9, 24e9, "NVIDIA A10 datasheet", 31.2e12),
        # NVIDIA L40S datasheet: 362 TFLOPS bf16 dense, 91.6 fp32, 864 GB/s, 48 GB.
        Accelerator("L40S", 362e12, 864e9, 48e9, "NVIDIA L40S datasheet", 91.6e12),
        # NVIDIA Ampere GA102 whitepaper, RTX 3090: 71 TFLOPS bf16 (fp32 accumulate), 35.6 fp32, 936 GB/s.
        Accelerator("RTX3090", 71e12, 936e9, 24e9, "NVIDIA Ampere GA102 whitepaper (RTX 3090)", 35.6e12),
        # AMD Instinct MI300X datasheet: 1307.4 TFLOPS bf16 dense, 5.3 TB/s, 192 GB.
        Accelerator("MI300X", 1307.4e12, 5.3e12, 192e9, "AMD Instinct MI300X datasheet", 163.4e12),
    )
}


def _key(name: str) -> str:
    return "".join(ch for ch in name.upper() if ch.isalnum())


def accelerator(name: str) -> Accelerator:
    """Look up an accelerator by name, ignoring case, spaces and dashes ('h100', 'A100-40GB')."""
    found = {_key(k): a for k, a in ACCELERATORS.items()}.get(_key(name))
    if found is None:
        raise ValueError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}")
    return found


def match_device(device_name: str) -> Accelerator | None:
    """The accelerator a device name ('NVIDIA H100 80GB HBM3', 'NVIDIA L40S') denotes, or None: the
    longest table key contained in the name, so 'H100 PCIe' is H100-PCIE and 'L40S' is not L4."""
    name = _key(device_name)
    hits = [a for k, a in ACCELERATORS.items() if _key(k) in name]
    return max(hits, key=lambda a: len(_key(a.name)), default=None)


# ---- memory -------------------------------------------------------------------------------------
def weights_bytes(cfg: ModelConfig, dtype: str = "bf16") -> int:
    """Bytes of the weights stored in `dtype` ('fp32', 'bf16' or 'int8')."""
    if dtype not in BYTES_PER_VALUE:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {list(BYTES_PER_VALUE)}")
    return cfg.n_params() * BYTES_PER_VALUE[dtype]


def layer_activation_bytes(cfg: ModelConfig, layer: int, micro_batch: int, seq: int) -> float:
    """Bytes one block keeps for backward, with 16-bit activations.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1):
    s*b*h*(34 + 5*a*s/h) per layer without parallelism; 34*s*b*h for the linear layers, norms, GELU and
    dropout masks, 5*a*s^2*b for the attention scores, their softmax and its dropout mask. A locally
    banded layer only forms scores against its band, so its key count is min(s, window) instead of s.
    Fused attention kernels (flash / memory-efficient SDPA) keep no scores at all; this is the upper
    bound of an unfused implementation.
    """
    s, b, h, a = seq, micro_batch, cfg.n_embd, cfg.n_head
    keys = min(s, cfg.local_window) if cfg.is_local(layer) else s
    return s * b * h * 34 + 5 * a * s * keys * b


def output_activation_bytes(cfg: ModelConfig, micro_batch: int, seq: int) -> float:
    """The final LayerNorm's and output projection's 16-bit inputs (2*s*b*h each) and the fp32
    logits the cross-entropy keeps (4*s*b*V), as Korthikanti et al. 2022 (section 4.3) count them."""
    s, b = seq, micro_batch
    return 4 * s * b * cfg.n_embd + 4 * s * b * cfg.vocab_size


def activation_bytes(
    cfg: ModelConfig, micro_batch: int = 1, seq: int | None = None, checkpointing: bool = False
) -> float:
    """Peak activation memory of one micro-batch of `seq` tokens (default: the full context).

    Without checkpointing every block keeps its activations (`layer_activation_bytes`). With full
    activation checkpointing only each block's 16-bit input stays (2*s*b*h per layer), plus one block's
    activations while it is recomputed during backward.
    """
    seq = cfg.n_ctx if seq is None else seq
    if micro_batch < 1 or seq < 1:
        raise ValueError(f"micro-batch ({micro_batch}) and sequence length ({seq}) must be positive")
    per_layer = [layer_activation_bytes(cfg, i, micro_batch, seq) for i in range(cfg.n_layer)]
    if checkpointing:
        blocks = cfg.n_layer * 2 * seq * micro_batch * cfg.n_embd + max(per_layer)
    else:
        blocks = sum(per_layer)
    return blocks + output_activation_bytes(cfg, micro_batch, seq)


def training_memory(
    cfg: ModelConfig, micro_batch: int = 1, seq: int | None = None, checkpointing: bool = False
) -> dict[str, float]:
    """Bytes to train with AdamW in mixed precision: weights, gradients, optimizer state, activations."""
    n = cfg.n_params()
    parts = {
        "weights": float(n * TRAIN_WEIGHT_BYTES),
        "gradients": float(n * TRAIN_GRAD_BYTES),
        "optimizer": float(n * ADAMW_STATE_BYTES),
        "activations": activation_bytes(cfg, micro_batch, seq, checkpointing),
    }
    parts["total"] = sum(parts.values())
    return parts


def kv_cache_bytes(cfg: ModelConfig, tokens: int | None = None, bytes_per_value: int = 2) -> int:
    """KV-cache bytes for `tokens` tokens (default: a full context) of one sequence."""
    return cfg.kv_bytes_per_token(bytes_per_value) * (cfg.n_ctx if tokens is None else tokens)


# ---- budgets and time ---------------------------------------------------------------------------
def compute_optimal_tokens(cfg: ModelConfig) -> float:
    """Chinchilla's compute-optimal training tokens for this model size."""
    return CHINCHILLA_TOKENS_PER_PARAM * cfg.n_params()


def training_seconds(
    cfg: ModelConfig, tokens: float, gpu: str | Accelerator, n_gpus: int = 1, mfu: float = 0.4
) -> float:
    """Wall-clock seconds to train on `tokens` tokens at model-FLOPs utilisation `mfu`."""
    acc = gpu if isinstance(gpu, Accelerator) else accelerator(gpu)
    _check_hw(n_gpus, mfu)
    return cfg.training_flops(tokens) / (n_gpus * acc.peak_flops * mfu)


def inference_tokens_per_s(cfg: ModelConfig, gpu: str | Accelerator, n_gpus: int = 1) -> float:
    """Upper bound on decoding speed at batch 1: each new token reads every bf16 weight once, so
    tokens/s <= bandwidth / weight bytes (n_gpus sharding the weights, tensor parallel, ideally)."""
    acc = gpu if isinstance(gpu, Accelerator) else accelerator(gpu)
    _check_hw(n_gpus, 1.0)
    return n_gpus * acc.bandwidth / weights_bytes(cfg, "bf16")


def _check_hw(n_gpus: int, mfu: float) -> None:
    if not isinstance(n_gpus, int) or n_gpus < 1:
        raise ValueError(f"number of GPUs must be a positive integer, got {n_gpus!r}")
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu!r}; 0.3-0.5 is typical for large runs")


def sizing(
    cfg: ModelConfig,
    tokens: float = 300e9,
    micro_batch: int = 1,
    gpu: str = "A100",
    n_gpus: int = 1,
    mfu: float = 0.4,
) -> dict[str, Any]:
    """Every quantity `gptlab compare` shows for one model, as plain numbers (bytes, FLOPs, seconds)."""
    if tokens <= 0 or not math.isfinite(tokens):
        raise ValueError(f"token budget must be a positive number, got {tokens!r}")
    acc = accelerator(gpu)
    mem = training_memory(cfg, micro_batch)
    mem_ckpt = training_memory(cfg, micro_batch, checkpointing=True)
    train_s = training_seconds(cfg, tokens, acc, n_gpus, mfu)
    return {
        "name": cfg.name,
        "n_layer": cfg.n_layer,
        "d_model": cfg.n_embd,
        "n_head": cfg.n_head,
        "head_size": cfg.head_size,
        "n_ctx": cfg.n_ctx,
        "attention": "dense" if cfg.attn_pattern == "dense" else f"dense/local({cfg.local_window})",
        "params": cfg.n_params(),
        "params_embedding": cfg.n_params() - cfg.n_params(embeddings=False),
        "params_non_embedding": cfg.n_params(embeddings=False),
        "fwd_flops_per_token": cfg.flops_per_token(),
        "train_tokens": float(tokens),
        "train_flops": cfg.training_flops(tokens),
        "weights_fp32_bytes": weights_bytes(cfg, "fp32"),
        "weights_bf16_bytes": weights_bytes(cfg, "bf16"),
        "weights_int8_bytes": weights_bytes(cfg, "int8"),
        "train_weights_bytes": mem["weights"],
        "train_gradients_bytes": mem["gradients"],
        "train_optimizer_bytes": mem["optimizer"],
        "micro_batch": micro_batch,
        "activations_bytes": mem["activations"],
        "activations_checkpointed_bytes": mem_ckpt["activations"],
        "train_memory_bytes": mem["total"],
        "train_memory_checkpointed_bytes": mem_ckpt["total"],
        "kv_bytes_per_token": cfg.kv_bytes_per_token(2),
        "kv_bytes_full_context": kv_cache_bytes(cfg),
        "chinchilla_tokens": compute_optimal_tokens(cfg),
        "gpu": acc.name,
        "n_gpus": n_gpus,
        "mfu": mfu,
        "train_days": train_s / 86400,
        "inference_tokens_per_s": inference_tokens_per_s(cfg, acc, n_gpus),
    }
