"""GGUF export for llama.cpp, written with the `gguf` package (llama.cpp's own writer).

The file describes llama.cpp's `gpt2` architecture: learned position embeddings, pre-LayerNorm blocks
with a fused QKV projection and biases, tanh-GELU MLP, final LayerNorm and an output projection. Our
`nn.Linear` weights are already (out, in), the layout GGUF stores, so unlike Hugging Face's `Conv1D`
nothing is transposed. Tensor names follow `gguf.MODEL_TENSORS[MODEL_ARCH.GPT2]`.

The tokenizer goes in as llama.cpp's BPE (`tokenizer.ggml.model = gpt2`, pre-tokenizer `gpt-2`):
tokens in GPT-2's byte-to-unicode spelling, merges as "left right" strings in rank order, and
`<|endoftext|>` as BOS / EOS. A model whose vocabulary is padded beyond the tokenizer's gets unused
`[PAD<id>]` tokens, as llama.cpp's own converter writes them.

Not expressible: GPT-3's alternating dense / locally banded attention (llama.cpp's gpt2 graph has no
per-layer band), so such models are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gptlab.config import ModelConfig
from gptlab.interop.progress import Progress
from gptlab.model import GPT

if TYPE_CHECKING:
    from gptlab.tokenizer import Tokenizer

DTYPES = ("f32", "f16", "q8_0")
_EXTRA = "pip install 'gptlab[export]'"
_EOT = "<|endoftext|>"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"GGUF export needs the gguf package ({e}); {_EXTRA}") from None
    return gguf


def check_gguf_compatible(config: ModelConfig) -> None:
    """Raise ValueError when llama.cpp's gpt2 architecture cannot run `config` exactly."""
    if config.attn_pattern != "dense" and config.local_layers and config.local_window < config.n_ctx:
        raise ValueError(
            f"model {config.name!r} uses attn_pattern={config.attn_pattern!r} (locally banded layers "
            f"{config.local_layers[:4]}... with a {config.local_window}-token window); llama.cpp's gpt2 "
            "architecture has only dense causal attention, so the exported model would compute different "
            "logits. Export it to ONNX instead (`--format onnx`), which implements the band"
        )


def tokenizer_vocab(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """GGUF token strings, token types and merges for a model with `vocab_size` embedding rows."""
    gguf = _gguf()
    from gptlab.tokenizer import bytes_to_unicode

    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model embeds only {vocab_size}; "
            "pass the tokenizer the model was trained with (--tokenizer DIR)"
        )
    table = {b: c for b, c in bytes_to_unicode().items()}  # str.translate: byte value -> symbol
    spell = lambda token: token.decode("latin-1").translate(table)
    special = {i: s for s, i in tokenizer.special_tokens.items()}
    tokens, types = [], []
    for i in range(tokenizer.vocab_size):
        if i in special:
            tokens.append(special[i])
            types.append(int(gguf.TokenType.CONTROL))
        else:
            tokens.append(spell(tokenizer.token_bytes(i)))
            types.append(int(gguf.TokenType.NORMAL))
    for i in range(tokenizer.vocab_size, vocab_size):  # rows the model has but no text maps to
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    merges = [f"{spell(a)} {spell(b)}" for a, b in tokenizer.merges]
    return tokens, types, merges


def _tensors(model: GPT) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) pairs in llama.cpp's gpt2 naming."""
    tr = model.transformer
    out = [("token_embd.weight", tr.wte.weight), ("position_embd.weight", tr.wpe.weight)]
    for i, block in enumerate(tr.h):
        p = f"blk.{i}"
        out += [
            (f"{p}.attn_norm.weight", block.ln_1.weight),
            (f"{p}.attn_norm.bias", block.ln_1.bias),
            (f"{p}.attn_qkv.weight", block.attn.c_attn.weight),
            (f"{p}.attn_qkv.bias", block.attn.c_attn.bias),
            (f"{p}.attn_output.weight", block.attn.c_proj.weight),
            (f"{p}.attn_output.bias", block.attn.c_proj.bias),
            (f"{p}.ffn_norm.weight", block.ln_2.weight),
            (f"{p}.ffn_norm.bias", block.ln_2.bias),
            (f"{p}.ffn_up.weight", block.mlp.c_fc.weight),
            (f"{p}.ffn_up.bias", block.mlp.c_fc.bias),
            (f"{p}.ffn_down.weight", block.mlp.c_proj.weight),
            (f"{p}.ffn_down.bias", block.mlp.c_proj.bias),
        ]
    out += [("output_norm.weight", tr.ln_f.weight), ("output_norm.bias", tr.ln_f.bias)]
    # llama.cpp reuses token_embd when `output` is absent, so tied models store the matrix once.
    if model.lm_head is not None:
        out.append(("output.weight", model.lm_head.weight))
    return out


def _encode_tensor(gguf: Any, data: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """Stored array and its GGML type: vectors stay f32 (as llama.cpp's converter keeps them)."""
    if data.ndim < 2 or dtype == "f32":
        return data, gguf.GGMLQuantizationType.F32
    if dtype == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:  # rows must be whole 32-value blocks; fall back like llama.cpp does
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


def _check_out_file(out_file: str | Path) -> Path:
    out_file = Path(out_file)
    if out_file.suffix != ".gguf":
        raise ValueError(f"GGUF output file {out_file} should end in .gguf, e.g. {out_file.with_suffix('.gguf')}")
    return out_file


def write_gguf(
    model: GPT,
    tokenizer: Tokenizer,
    out_file: str | Path,
    dtype: str = "f32",
    name: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write `model` and its tokenizer as one GGUF file (atomically) for llama.cpp's gpt2 architecture."""
    from tqdm.auto import tqdm

    gguf = _gguf()
    if dtype not in DTYPES:
        raise ValueError(f"GGUF dtype must be one of {list(DTYPES)}, got {dtype!r}")
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    config = model.config
    check_gguf_compatible(config)
    if _EOT not in tokenizer.special_tokens:
        raise ValueError(
            f"the tokenizer has no {_EOT} token (special tokens: {sorted(tokenizer.special_tokens)}); "
            "llama.cpp's gpt2 vocabulary needs it as BOS / EOS"
        )
    out_file = _check_out_file(out_file)
    tokens, types, merges = tokenizer_vocab(tokenizer, config.vocab_size)

    # The writer streams to a temporary file beside the target; the rename makes the write atomic.
    tmp = out_file.with_name(f".tmp-{out_file.name}")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with (progress or Progress(enabled=False)).stage(f"writing {out_file.name} ({dtype}, {config.n_layer} layers)"):
        writer = gguf.GGUFWriter(str(tmp), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        try:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(name or config.name)
            writer.add_context_length(config.n_ctx)
            writer.add_embedding_length(config.n_embd)
            writer.add_feed_forward_length(config.d_ff)
            writer.add_block_count(config.n_layer)
            writer.add_head_count(config.n_head)
            writer.add_layer_norm_eps(config.layer_norm_eps)
            file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}[dtype]
            writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
            if dtype == "q8_0":
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("gpt-2")
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges)
            eot = tokenizer.special_tokens[_EOT]
            writer.add_bos_token_id(eot)
            writer.add_eos_token_id(eot)
            writer.add_unk_token_id(eot)
            writer.add_add_bos_token(False)  # GPT-2 prompts start with text, not <|endoftext|>
            for tensor_name, tensor in tqdm(_tensors(model), desc=f"gguf {dtype}", unit="tensor", leave=False):
                data = tensor.detach().to("cpu", torch.float32).numpy()
                stored, qtype = _encode_tensor(gguf, data, dtype)
                writer.add_tensor(tensor_name, stored, raw_dtype=qtype)  # q8_0 bytes: shape derived
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
            writer.close()
            tmp.replace(out_file)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
    return out_file


def export_gguf(
    src: str | Path,
    out_file: str | Path,
    dtype: str = "f32",
    tokenizer: str | Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """`gptlab export SRC --format gguf`: a gptlab checkpoint / run or Hugging Face GPT-2 directory."""
    from gptlab.checkpoint import load_model, load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"GGUF dtype must be one of {list(DTYPES)}, got {dtype!r}")
    _check_out_file(out_file)
    progress = progress or Progress(enabled=False)
    with progress.stage(f"loading {src}"):
        model = load_model(src)
        check_gguf_compatible(model.config)
        tok = load_tokenizer(tokenizer if tokenizer is not None else src)
    return write_gguf(model, tok, out_file, dtype, name=Path(src).name, progress=progress)
