"""ONNX export: one graph, `model.onnx`, in the layout Hugging Face Optimum's `ORTModelForCausalLM` loads,
beside a `config.json` (GPT-2's), `generation_config.json` and the tokenizer (slow files and tokenizer.json).

The graph comes from `torch.onnx.export` (the dynamo exporter, torch's default since 2.9) tracing a
small wrapper that computes the GPT forward pass from the model's own weights with explicit tensors:
a boolean attention mask instead of the inference engine's block tables, and past keys / values as graph
inputs. `GPT` itself is untouched; tests check the exported logits against it within 1e-4 in fp32, and
load the directory in Optimum.

`model.onnx` (Optimum's names, so `ORTModelForCausalLM.from_pretrained(DIR)` generates with its KV cache)
    inputs   input_ids (B, T) int64, attention_mask (B, P + T) int64 (1 = real token, 0 = left padding),
             position_ids (B, T) int64, past_key_values.{i}.key / .value (B, nh, P, hs) per layer i (P may be 0)
    outputs  logits (B, T, vocab), present.{i}.key / .value (B, nh, P + T, hs)
Left-padded batches take position ids `cumsum(attention_mask) - 1`, as gptlab's generation loop and
transformers do. Locally banded layers (GPT-3's alternating pattern) apply the band over cache slots, as
`GPT` does; the graph carries the band, so Optimum runs such a model too (its config.json says gpt2,
whose own attention is dense: `gptlab` in config.json records the real config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.config import ModelConfig
from gptlab.interop.progress import Progress
from gptlab.model import GPT

MODEL_FILE = "model.onnx"
EXPORT_INFO_FILE = "export.json"
_EXTRA = "pip install 'gptlab[export]'"


def require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"ONNX export and decoding need the {module} package ({e}); {_EXTRA}") from None


class _Exportable(nn.Module):
    """The GPT forward pass over explicit tensors, sharing `model`'s parameters (nothing copied)."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.gpt = model
        config = model.config
        self.n_head, self.n_embd, self.window = config.n_head, config.n_embd, config.local_window
        self.local = [config.is_local(i) for i in range(config.n_layer)]

    def _run(
        self, input_ids: Tensor, positions: Tensor, mask: Tensor, local_mask: Tensor, past: Sequence[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        """mask / local_mask: (B, 1, T, P + T) bool, True where a query may attend to a slot."""
        tr = self.gpt.transformer
        B, T = input_ids.shape
        hs = self.n_embd // self.n_head
        x = tr.wte(input_ids) + tr.wpe(positions)  # (B, T, C)
        presents: list[Tensor] = []
        for i, block in enumerate(tr.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(self.n_embd, dim=2)
            q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, self.n_head, hs).transpose(1, 2)
            v = v.view(B, T, self.n_head, hs).transpose(1, 2)
            if past:
                k = torch.cat([past[2 * i], k], dim=2)  # (B, nh, P + T, hs)
                v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=local_mask if self.local[i] else mask)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, self.n_embd))
            x = x + block.mlp(block.ln_2(x))
        return self.gpt.logits(tr.ln_f(x)), presents

    def _masks(self, valid: Tensor, T: int) -> tuple[Tensor, Tensor]:
        """Causal (and banded) masks for the last T of S = P + T slots; valid: (B, S) bool."""
        S = valid.shape[1]
        q = torch.arange(T, device=valid.device)[:, None] + (S - T)  # slot of each query
        s = torch.arange(S, device=valid.device)[None, :]
        causal = s <= q
        own = (s == q)[None, None]  # a padding query attends to itself: no all-masked row (NaN)
        keys = valid[:, None, None, :]  # (B, 1, 1, S)
        dense = (causal[None, None] & keys) | own
        local = ((causal & (q - s < self.window))[None, None] & keys) | own
        return dense, local


class WithPastModule(_Exportable):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present): the graph of `model.onnx`."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor) -> tuple:
        T = input_ids.shape[1]
        mask, local_mask = self._masks(attention_mask.bool(), T)
        logits, presents = self._run(input_ids, position_ids, mask, local_mask, past)
        return (logits, *presents)


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """Input and output names of `model.onnx` (Optimum's: past_key_values.{i}.key, present.{i}.key, ...)."""
    past = [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


EXPORTERS = ("dynamo", "torchscript")


def _export(module: nn.Module, args: tuple, file: Path, names: tuple[list[str], list[str]], exporter: str) -> None:
    """Export `module` with dynamic batch / sequence / past axes.

    'dynamo' (torch.export, torch's default since 2.9) is the supported path; 'torchscript' (the legacy
    tracer, deprecated by torch) gives the same graph in about a tenth of the time.
    """
    in_names, out_names = names
    with warnings.catch_warnings(), _quiet_logger("torch.onnx"), torch.no_grad():
        warnings.simplefilter("ignore")  # both exporters warn about their own internals on every call
        if exporter == "torchscript":
            axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "position_ids", "logits")}
            axes["attention_mask"] = {0: "batch", 1: "total_sequence"}
            axes |= {n: {0: "batch", 2: "past_sequence"} for n in in_names[3:]}
            axes |= {n: {0: "batch", 2: "total_sequence"} for n in out_names[1:]}
            torch.onnx.export(
                module,
                args,
                str(file),
                dynamo=False,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes={n: a for n, a in axes.items() if n in in_names + out_names},
                opset_version=17,
            )
            return
        require("onnxscript")
        dyn = torch.export.Dim.DYNAMIC  # P + T relations between inputs are inferred by torch.export
        shapes: dict[str, Any] = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}}
        shapes["position_ids"] = {0: dyn, 1: dyn}
        shapes["past"] = tuple({0: dyn, 2: dyn} for _ in args[3:])
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=in_names,
            output_names=out_names,
            dynamic_shapes=shapes,
            optimize=True,
            verbose=False,
        )
        program.save(str(file))  # weights over 2 GB go to an external data file beside it


def optimum_config(config: ModelConfig, eos: int | None) -> dict[str, Any]:
    """config.json: GPT-2's keys (what Optimum reads: model type, heads, width, use_cache) and, under
    `gptlab`, the model's own config (GPT-3's banded layers, which GPT-2's config cannot say)."""
    from gptlab.interop.hf import model_config_to_hf_config

    hf = model_config_to_hf_config(dataclasses.replace(config, attn_pattern="dense"), torch.float32, eos)
    return {**hf, "gptlab": config.to_dict()}


def export_onnx(
    model: GPT, out_dir: str | Path, tokenizer: Any = None, exporter: str = "dynamo", progress: Progress | None = None
) -> Path:
    """Write model.onnx, config.json, generation_config.json, export.json (and the tokenizer) into
    `out_dir`, atomically; `progress` reports each stage."""
    from gptlab.checkpoint import atomic_dir
    from gptlab.interop.hf import end_of_text_id, write_generation_files

    if exporter not in EXPORTERS:
        raise ValueError(f"ONNX exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    require("onnx")
    progress = progress or Progress(enabled=False)
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    config = model.config
    if config.n_ctx < 7:
        raise ValueError(f"ONNX export traces with 7 positions; the model's context is only {config.n_ctx}")
    eos = end_of_text_id(config, tokenizer)
    was_training = model.training
    model.eval()
    # Example sizes of at least 2: torch.export would specialise a size of 0 or 1 into a constant.
    B, T, P = 2, 3, 4
    ids = torch.zeros(B, T, dtype=torch.long)
    positions = torch.arange(P, P + T)[None, :].expand(B, T)
    in_names, out_names = io_names(config.n_layer)
    past = tuple(torch.zeros(B, config.n_head, P, config.head_size) for _ in range(2 * config.n_layer))
    mask = torch.ones(B, P + T, dtype=torch.long)
    try:
        with atomic_dir(out_dir) as tmp:
            float_model = model if next(model.parameters()).dtype == torch.float32 else _float_copy(model)
            with progress.stage(f"tracing the model into {MODEL_FILE} (torch.onnx, {exporter} exporter)"):
                module = WithPastModule(float_model)
                _export(module, (ids, mask, positions, *past), tmp / MODEL_FILE, (in_names, out_names), exporter)
            with progress.stage("writing config.json, generation_config.json and the tokenizer"):
                info = {
                    "format": "gptlab-onnx",
                    "exporter": exporter,
                    "model": config.to_dict(),
                    "file": MODEL_FILE,
                    "inputs": in_names,
                    "outputs": out_names,
                    "past_shape": ["batch", config.n_head, "past_sequence", config.head_size],
                }
                (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
                (tmp / "config.json").write_text(json.dumps(optimum_config(config, eos), indent=2) + "\n")
                write_generation_files(tmp, config.n_ctx, tokenizer, eos)
    finally:
        model.train(was_training)
    return Path(out_dir)


def _float_copy(model: GPT) -> GPT:
    import copy

    return copy.deepcopy(model).float()


def export_checkpoint_onnx(
    src: str | Path,
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    exporter: str = "dynamo",
    progress: Progress | None = None,
) -> Path:
    """`gptlab export SRC --format onnx`: a gptlab checkpoint / run or Hugging Face GPT-2 directory.

    The tokenizer (when the checkpoint has one, or `tokenizer` names it) is saved into out_dir in
    Hugging Face's files, which gptlab reads too.
    """
    from gptlab.checkpoint import load_model, load_tokenizer

    progress = progress or Progress(enabled=False)
    with progress.stage(f"loading {src}"):
        model = load_model(src)
        tok = None
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
        else:
            with contextlib.suppress(FileNotFoundError):
                tok = load_tokenizer(src)  # a model trained on raw ids exports without one
    return export_onnx(model, out_dir, tok, exporter, progress)
