"""ONNX export: `model.onnx` (input_ids -> logits) and `model_with_past.onnx` (incremental decoding).

Both graphs come from `torch.onnx.export` (the dynamo exporter, torch's default since 2.9) tracing a
small wrapper that computes the GPT forward pass from the model's own weights with explicit tensors:
a boolean attention mask instead of the inference engine's block tables, and past keys / values as graph inputs.
`GPT` itself is untouched; tests check the exported logits against it within 1e-4 in fp32.

`model_with_past.onnx`
    inputs   input_ids (B, T) int64, attention_mask (B, P + T) int64 (1 = real token, 0 = left padding),
             past_key.{i} / past_value.{i} (B, nh, P, hs) for each layer i (P may be 0)
    outputs  logits (B, T, vocab), present_key.{i} / present_value.{i} (B, nh, P + T, hs)
Position ids are `cumsum(attention_mask) - 1`, so left-padded batches get the same positions as
gptlab's generation loop. Locally banded layers (GPT-3's alternating pattern) apply the band over cache
slots, as `GPT` does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.model import GPT

MODEL_FILE = "model.onnx"
WITH_PAST_FILE = "model_with_past.onnx"
EXPORT_INFO_FILE = "export.json"
_EXTRA = "pip install 'gptlab[export]'"


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the {module} package ({e}); {_EXTRA}") from None


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


class LogitsModule(_Exportable):
    """input_ids (B, T) -> logits (B, T, vocab), the graph of `model.onnx`."""

    def forward(self, input_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)[None, :]
        valid = torch.ones_like(input_ids, dtype=torch.bool)
        mask, local_mask = self._masks(valid, T)
        return self._run(input_ids, positions, mask, local_mask, ())[0]


class WithPastModule(_Exportable):
    """(input_ids, attention_mask, *past) -> (logits, *present), the graph of `model_with_past.onnx`."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        T = input_ids.shape[1]
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -T:]  # (B, T)
        mask, local_mask = self._masks(attention_mask.bool(), T)
        logits, presents = self._run(input_ids, positions, mask, local_mask, past)
        return (logits, *presents)


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """Input and output names of `model_with_past.onnx`."""
    past = [f"past_{kind}.{i}" for i in range(n_layer) for kind in ("key", "value")]
    present = [f"present_{kind}.{i}" for i in range(n_layer) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", *past], ["logits", *present]


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
            axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "logits")}
            axes["attention_mask"] = {0: "batch", 1: "total_sequence"}
            axes |= {n: {0: "batch", 2: "past_sequence"} for n in in_names[2:]}
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
        _require("onnxscript")
        dyn = torch.export.Dim.DYNAMIC  # P + T relations between inputs are inferred by torch.export
        shapes: dict[str, Any] = {"input_ids": {0: dyn, 1: dyn}}
        if len(args) > 1:
            shapes["attention_mask"] = {0: dyn, 1: dyn}
            shapes["past"] = tuple({0: dyn, 2: dyn} for _ in args[2:])
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


def export_onnx(model: GPT, out_dir: str | Path, tokenizer: Any = None, exporter: str = "dynamo") -> Path:
    """Write model.onnx, model_with_past.onnx, export.json (and the tokenizer) into `out_dir`, atomically."""
    from gptlab.checkpoint import atomic_dir

    if exporter not in EXPORTERS:
        raise ValueError(f"ONNX exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    _require("onnx")
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    config = model.config
    if config.n_ctx < 7:
        raise ValueError(f"ONNX export traces with 7 positions; the model's context is only {config.n_ctx}")
    was_training = model.training
    model.eval()
    # Example sizes of at least 2: torch.export would specialise a size of 0 or 1 into a constant.
    B, T, P = 2, 3, 4
    ids = torch.zeros(B, T, dtype=torch.long)
    in_names, out_names = io_names(config.n_layer)
    past = tuple(torch.zeros(B, config.n_head, P, config.head_size) for _ in range(2 * config.n_layer))
    mask = torch.ones(B, P + T, dtype=torch.long)
    try:
        with atomic_dir(out_dir) as tmp:
            float_model = model if next(model.parameters()).dtype == torch.float32 else _float_copy(model)
            logits_names = (["input_ids"], ["logits"])
            _export(LogitsModule(float_model), (ids,), tmp / MODEL_FILE, logits_names, exporter)
            past_args, past_names = (ids, mask, *past), (in_names, out_names)
            _export(WithPastModule(float_model), past_args, tmp / WITH_PAST_FILE, past_names, exporter)
            info = {
                "format": "gptlab-onnx",
                "exporter": exporter,
                "model": config.to_dict(),
                "files": {"logits": MODEL_FILE, "with_past": WITH_PAST_FILE},
                "inputs": in_names,
                "outputs": out_names,
                "past_shape": ["batch", config.n_head, "past_sequence", config.head_size],
            }
            (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save(tmp / "tokenizer")
    finally:
        model.train(was_training)
    return Path(out_dir)


def _float_copy(model: GPT) -> GPT:
    import copy

    return copy.deepcopy(model).float()


def export_checkpoint_onnx(
    src: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None, exporter: str = "dynamo"
) -> Path:
    """`gptlab export SRC --format onnx`: a gptlab checkpoint / run or Hugging Face GPT-2 directory.

    The tokenizer (when the checkpoint has one, or `tokenizer` names it) is saved under out_dir/tokenizer.
    """
    from gptlab.checkpoint import load_model, load_tokenizer

    model = load_model(src)
    tok = None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        with contextlib.suppress(FileNotFoundError):
            tok = load_tokenizer(src)  # a model trained on raw ids exports without one
    return export_onnx(model, out_dir, tok, exporter)


# ---- running the exported graphs with onnxruntime ------------------------------------------------
class OnnxDecoder:
    """Greedy incremental decoding over `model_with_past.onnx` with onnxruntime (CPU)."""

    def __init__(self, export_dir: str | Path, threads: int | None = None) -> None:
        ort = _require("onnxruntime")
        export_dir = Path(export_dir)
        file = export_dir / WITH_PAST_FILE
        for needed in (file, export_dir / EXPORT_INFO_FILE):
            if not needed.is_file():
                raise FileNotFoundError(
                    f"{needed} does not exist; write the directory with `gptlab export CKPT --format onnx --out DIR`"
                )
        info = json.loads((export_dir / EXPORT_INFO_FILE).read_text())
        self.n_layer, self.n_head = info["model"]["n_layer"], info["model"]["n_head"]
        self.head_size = info["model"]["n_embd"] // self.n_head
        self.n_ctx = info["model"]["n_ctx"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        self.inputs, self.outputs = io_names(self.n_layer)

    def step(self, ids: Any, mask: Any, past: list[Any]) -> tuple[Any, list[Any]]:
        """One forward call: (B, T) ids, (B, P + T) mask, 2 * n_layer past arrays -> logits, presents."""
        feed = {"input_ids": ids, "attention_mask": mask, **dict(zip(self.inputs[2:], past, strict=True))}
        logits, *present = self.session.run(self.outputs, feed)
        return logits, present

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt (left-padded to a batch); new ids only."""
        import numpy as np

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("pass one or more non-empty prompts (lists of token ids)")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.n_ctx:
            raise ValueError(
                f"{longest} prompt tokens + {max_new_tokens} new tokens exceed the context of {self.n_ctx}"
            )
        B = len(prompts)
        ids = np.zeros((B, longest), dtype=np.int64)
        mask = np.zeros((B, longest), dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, longest - len(p) :] = p
            mask[b, longest - len(p) :] = 1
        past = [np.zeros((B, self.n_head, 0, self.head_size), dtype=np.float32) for _ in self.inputs[2:]]
        out = np.zeros((B, max_new_tokens), dtype=np.int64)
        for t in range(max_new_tokens):
            logits, past = self.step(ids, mask, past)
            ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            out[:, t] = ids[:, 0]
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
        return out.tolist()


def run_logits(export_dir: str | Path, input_ids: Any) -> Any:
    """Logits of `model.onnx` for an int64 (B, T) array (a convenience for checks)."""
    import numpy as np

    ort = _require("onnxruntime")
    session = ort.InferenceSession(str(Path(export_dir) / MODEL_FILE), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": np.asarray(input_ids, dtype=np.int64)})[0]
