"""Preparing a model for inference: loading it with its tokenizer, and choosing its CPU kernels."""

from __future__ import annotations

from typing import Any

import torch

from gptlab.model import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_for_generation(
    checkpoint: str,
    *,
    dtype: str = "float32",
    quantize: str | None = None,
    device: str = "cpu",
    tokenizer: str | None = None,
    pack: bool = True,
) -> tuple[GPT, Any]:
    """Model (see `prepare_model`) and tokenizer of a gptlab run / checkpoint or Hugging Face GPT-2 directory."""
    from gptlab.checkpoint import load_model, load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    model = load_model(checkpoint, device=device, dtype=DTYPES[dtype])
    return prepare_model(model, quantize=quantize, pack=pack), load_tokenizer(tokenizer or checkpoint)


def prepare_model(model: GPT, *, quantize: str | None = None, pack: bool = True, kernels: bool = True) -> GPT:
    """Swap a CPU model's linear layers for faster kernels (see `gptlab.infer.quantize`), in place.

    Where `gptlab.infer.cpu.kernels` builds (a C compiler and AVX2): float32, bfloat16 or (quantize='int8')
    int8 weights on gptlab's few-row kernels, float32 activations. Elsewhere: float32 weights
    prepacked for oneDNN; bfloat16 without native bf16 matmuls in fbgemm's half-precision GEMM;
    int8 in fbgemm's dynamic int8 GEMM. `compile=True` needs the plain layers: pass pack=False (int8
    cannot be compiled). kernels=False: torch's kernels even where gptlab's build (for comparison).
    """
    from gptlab.infer.cpu import kernels as cpu_kernels
    from gptlab.infer.quantize import STORAGE, pack_float32, pack_half, quantize_int8, use_cpu_kernels

    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be 'int8' or None, got {quantize!r}")
    weight = model.transformer.wte.weight
    if pack and weight.device.type == "cpu":
        storage = "int8" if quantize == "int8" else {v: k for k, v in STORAGE.items()}.get(weight.dtype)
        if storage is not None and kernels and cpu_kernels.available():
            return use_cpu_kernels(model, storage)
    if quantize == "int8":
        quantize_int8(model).float()
    elif pack and weight.device.type == "cpu":
        if weight.dtype == torch.float32:
            pack_float32(model)
        elif weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            pack_half(model)
    return model
