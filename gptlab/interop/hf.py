"""Hugging Face GPT-2 interop: load a `GPT2LMHeadModel` directory (or hub name) as a `GPT`, and write
a `GPT` as a directory that `transformers.GPT2LMHeadModel.from_pretrained` loads unchanged.

Neither direction needs transformers: the config is plain JSON and the weights are safetensors (or a
`pytorch_model.bin` read with `torch.load(weights_only=True)`). Our parameter names are GPT-2's, so
the one layout difference is HF's `Conv1D`, which stores its weight as (in, out), the transpose of
`nn.Linear`'s (out, in).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gptlab.config import ModelConfig
from gptlab.files import CONFIG_FILE, WEIGHTS_FILE, atomic_dir, read_safetensors, state_dict_for_save
from gptlab.model import GPT

if TYPE_CHECKING:
    from gptlab.tokenizer import Tokenizer

BIN_FILE = "pytorch_model.bin"
SHARD_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# What a hub download fetches: config, safetensors weights (single or sharded) and the tokenizer;
# never the TF / Flax / ONNX / pickle copies most GPT-2 repositories also carry.
HUB_FILES = [CONFIG_FILE, WEIGHTS_FILE, SHARD_INDEX_FILE, "model-*-of-*.safetensors", *TOKENIZER_FILES]

# HF Conv1D modules; every other 2-D weight (wte, wpe, lm_head) already has nn's layout.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers that older transformers versions saved with the weights.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
# All three are GELU's tanh approximation (Hendrycks & Gimpel 2016), which is what `MLP` computes.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# GPT2Config's defaults, for keys an older config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


# ---- config -------------------------------------------------------------------------------------
def hf_config_to_model_config(hf: dict[str, Any], source: str | Path = CONFIG_FILE) -> ModelConfig:
    """Map a GPT-2 `config.json` onto `ModelConfig`, refusing anything gptlab would compute differently."""
    c = {**_HF_DEFAULTS, **hf}
    if "n_positions" not in hf and "n_ctx" in hf:  # the oldest configs name the context n_ctx only
        c["n_positions"] = hf["n_ctx"]
    if hf.get("format") == "gptlab":
        raise ValueError(f"{source} is a gptlab checkpoint, not a Hugging Face one; load it with load_model")
    if "model_type" not in hf and not {"n_layer", "n_embd", "n_head"} <= set(hf):
        raise ValueError(f"{source} is not a Hugging Face GPT-2 config (no model_type, n_layer, n_embd)")
    problems = []
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        problems.append(f"model_type is {model_type!r}; gptlab imports GPT-2 ('gpt2') models only")
    if c["activation_function"] not in TANH_GELUS:
        problems.append(
            f"activation_function is {c['activation_function']!r}; gptlab's MLP computes the tanh GELU "
            f"({' / '.join(TANH_GELUS)})"
        )
    if not c["scale_attn_weights"]:
        problems.append("scale_attn_weights is false; gptlab always scales attention by 1/sqrt(head size)")
    if c["scale_attn_by_inverse_layer_idx"]:
        problems.append("scale_attn_by_inverse_layer_idx is true; gptlab has no per-layer attention scaling")
    if c["reorder_and_upcast_attn"]:
        problems.append("reorder_and_upcast_attn is true; gptlab computes attention in the model's dtype")
    if c["add_cross_attention"]:
        problems.append("add_cross_attention is true; gptlab is decoder-only, with no cross-attention")
    if problems:
        raise ValueError(
            f"{source} describes a model gptlab cannot represent exactly: " + "; ".join(problems)
        )
    dropouts = {name: c[name] for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(dropouts.values())) > 1:
        # gptlab has one dropout rate; it only matters for training, never for the outputs.
        warnings.warn(
            f"{source} sets different dropout rates {dropouts}; gptlab uses one, resid_pdrop="
            f"{c['resid_pdrop']}, everywhere",
            stacklevel=2,
        )
    config = ModelConfig(
        n_layer=c["n_layer"],
        n_head=c["n_head"],
        n_embd=c["n_embd"],
        n_ctx=c["n_positions"],
        vocab_size=c["vocab_size"],
        n_inner=c["n_inner"],
        dropout=float(c["resid_pdrop"]),
        layer_norm_eps=float(c["layer_norm_epsilon"]),
        tie_embeddings=bool(c["tie_word_embeddings"]),
    )
    return dataclasses.replace(config, name=_preset_name(config))


def _preset_name(config: ModelConfig) -> str:
    """The preset whose shape this is ('gpt2' for the released 124M model), or 'custom'."""
    from gptlab.presets import PRESETS, preset

    def shape(c: ModelConfig) -> ModelConfig:
        return dataclasses.replace(c, name="", dropout=0.0)

    return next((n for n in PRESETS if shape(preset(n)) == shape(config)), "custom")


def model_config_to_hf_config(
    config: ModelConfig, dtype: torch.dtype = torch.float32, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The `config.json` of a GPT2LMHeadModel computing exactly what `GPT(config)` computes."""
    if config.attn_pattern != "dense":
        raise ValueError(
            f"this model uses attn_pattern={config.attn_pattern!r} (GPT-3's dense and locally banded "
            f"layers alternating, band {config.local_window}); Hugging Face's GPT2LMHeadModel only has "
            "dense causal attention, so it would compute different outputs. Keep this model in gptlab's "
            "own checkpoint format (gptlab.checkpoint.save_model)"
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.n_ctx,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


# ---- weights ------------------------------------------------------------------------------------
def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Tensors of model.safetensors (single or sharded), else pytorch_model.bin; errors name the file."""
    single, index, binary = directory / WEIGHTS_FILE, directory / SHARD_INDEX_FILE, directory / BIN_FILE
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e!r})") from None
        return {k: v for shard in shards for k, v in read_safetensors(directory / shard).items()}
    if binary.is_file():
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:  # zip, pickle and EOF errors: all mean this file is unusable
            raise ValueError(
                f"{binary} is truncated or corrupted (or not a plain tensor state dict) and cannot be read "
                f"({type(e).__name__}: {e})"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{binary} does not hold a state dict of tensors")
        return state
    raise FileNotFoundError(
        f"{directory} has a {CONFIG_FILE} but no weights: expected {WEIGHTS_FILE}, {SHARD_INDEX_FILE} "
        f"or {BIN_FILE}"
    )


def hf_state_dict_to_gptlab(
    state: dict[str, torch.Tensor], model: GPT, source: str | Path = "weights"
) -> dict[str, torch.Tensor]:
    """Rename, transpose and check HF GPT-2 tensors against `model`'s parameters."""
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(MASK_BUFFERS):
            continue
        if key == "lm_head.weight":
            if model.lm_head is not None:
                out[key] = tensor
            # Tied: transformers also ties lm_head to wte on load, whatever the file holds.
            continue
        name = "transformer." + key.removeprefix("transformer.")  # GPT2Model files lack the prefix
        out[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match its GPT-2 config: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(gptlab imports GPT2LMHeadModel / GPT2Model weights only)"
        )
    wrong = [
        f"{k}: {tuple(out[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if out[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"{source} has tensors whose shapes do not match its config: {wrong[:5]}")
    dtype = out["transformer.wte.weight"].dtype  # one dtype for all, as a mixed file would break matmuls
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def gptlab_state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel tensors: the same names, Conv1D weights transposed; no lm_head when tied."""
    return {
        k: v.t().contiguous() if k.endswith(CONV1D_WEIGHTS) else v
        for k, v in state_dict_for_save(model).items()
    }


# ---- load ---------------------------------------------------------------------------------------
def load_hf_model(directory: str | Path) -> GPT:
    """A `GPT` holding the weights of a Hugging Face GPT-2 directory (config.json + weights)."""
    directory = Path(directory)
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; pass a Hugging Face GPT-2 directory")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    config = hf_config_to_model_config(hf, file)
    state = read_hf_weights(directory)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(hf_state_dict_to_gptlab(state, model, directory), assign=True, strict=True)
    return model


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def download(name: str) -> Path:
    """Fetch a hub model's config, safetensors weights and tokenizer; the local snapshot directory.

    With HF_HUB_OFFLINE=1 only the local cache is consulted. huggingface_hub reads that variable once,
    at import, so we read it here too and pass `local_files_only`.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(
            f"downloading {name!r} from the Hugging Face Hub needs huggingface_hub: "
            "pip install 'gptlab[hf]', or pass a local directory"
        ) from None
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    try:
        path = Path(snapshot_download(repo_id=name, allow_patterns=HUB_FILES, local_files_only=offline))
        if not any((path / f).is_file() for f in (WEIGHTS_FILE, SHARD_INDEX_FILE)):
            # A repository with pickle weights only: fetch those too (read with weights_only=True).
            path = Path(snapshot_download(repo_id=name, allow_patterns=[BIN_FILE], local_files_only=offline))
    except Exception as e:  # offline, unknown repository, gated, network down: one actionable message
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
            if offline
            else f"the download failed ({type(e).__name__}: {e})"
        )
        raise FileNotFoundError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face Hub: {why}. "
            "Pass a local directory (a gptlab checkpoint or run, or a Hugging Face GPT-2 directory with "
            f"{CONFIG_FILE} + {WEIGHTS_FILE})"
        ) from None
    return path


# ---- export -------------------------------------------------------------------------------------
def save_hf(model: GPT, out_dir: str | Path, tokenizer: Tokenizer | None = None, source: str | None = None) -> Path:
    """Write `model` (and its tokenizer) as a complete Hugging Face GPT-2 directory, atomically: weights
    and config, `generation_config.json`, and with a tokenizer both its slow files and `tokenizer.json`
    (fast), end-of-text as bos / eos / pad with left padding (a batched `pipeline("text-generation")`
    works), and a model card (`README.md`) naming `source`.

    `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` then computes the same logits.
    """
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    config = model.config
    eos = end_of_text_id(config, tokenizer)
    hf_config = model_config_to_hf_config(config, model.transformer.wte.weight.dtype, eos)
    state = gptlab_state_dict_to_hf(model)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_generation_files(tmp, config.n_ctx, tokenizer, eos)
        (tmp / "README.md").write_text(_model_card(model, hf_config, tokenizer is not None, source))
    return out_dir


def write_generation_files(directory: Path, n_ctx: int, tokenizer: Tokenizer | None, eos: int | None) -> None:
    """`generation_config.json` and, with a tokenizer, its slow files and `tokenizer.json` (fast) with
    end-of-text as bos / eos / pad and left padding: what Hugging Face loaders (transformers, Optimum)
    read from a model directory."""
    generation = {"_from_model_config": True, "max_length": n_ctx}
    if eos is not None:
        generation |= {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is None:
        return
    tokenizer.save(directory)  # vocab.json + merges.txt + tokenizer_config.json, HF's GPT-2 format
    tokenizer.save_tokenizer_json(directory / "tokenizer.json")
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    settings |= {"tokenizer_class": "GPT2TokenizerFast", "model_max_length": n_ctx}
    if eos is not None:  # GPT-2 has no pad token; end-of-text pads, on the left for generation
        eot = "<|endoftext|>"
        specials = {"bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
        settings |= specials | {"padding_side": "left"}
        (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def end_of_text_id(config: ModelConfig, tokenizer: Tokenizer | None) -> int | None:
    """The end-of-text id a Hugging Face directory names as bos / eos / pad (GPT-2's without a tokenizer)."""
    if tokenizer is not None:
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                f"{config.vocab_size}; pass the tokenizer the model was trained with"
            )
        return tokenizer.special_tokens.get("<|endoftext|>")
    return 50256 if config.vocab_size > 50256 else None  # GPT-2's <|endoftext|>


def _model_card(model: GPT, hf_config: dict, has_tokenizer: bool, source: str | None) -> str:
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(hf_config.items()) if not isinstance(v, dict | list))
    tokenizer_line = (
        "The tokenizer (GPT-2 byte-level BPE) is included, slow and fast."
        if has_tokenizer
        else "No tokenizer: the model was trained on token ids."
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, gptlab]
---

# GPT-2-architecture model exported by gptlab

{params:,} parameters: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, a context of {c.n_ctx} tokens,
a vocabulary of {c.vocab_size}. Weights from: {source or "a gptlab model in memory"}.
{tokenizer_line}

```python
from transformers import pipeline
generate = pipeline("text-generation", model="PATH/TO/THIS/DIRECTORY")
print(generate("def ", max_new_tokens=32)[0]["generated_text"])
```

## config.json

| key | value |
|---|---|
{rows}
"""


__all__ = [
    "download",
    "gptlab_state_dict_to_hf",
    "hf_config_to_model_config",
    "hf_state_dict_to_gptlab",
    "load_hf_model",
    "model_config_to_hf_config",
    "read_hf_weights",
    "save_hf",
]
