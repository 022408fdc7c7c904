"""Checkpoints: a directory with config.json, model.safetensors and the tokenizer; atomic writes.

No pickle is ever read on the model load path: weights come from safetensors (or, for Hugging Face
`pytorch_model.bin`, `torch.load(weights_only=True)`). checksums.json records the SHA-256 of every file
gptlab wrote into a checkpoint; loading verifies the files it reads against it (a checkpoint written
before checksums existed has none and loads unverified), and rejects weights that are not finite.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gptlab.config import ModelConfig
from gptlab.files import (  # noqa: F401  (re-exported: the checkpoint API)
    CHECKSUMS_FILE,
    CONFIG_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    check_finite,
    file_sha256,
    read_checksums,
    read_safetensors,
    state_dict_for_save,
    verify_checksums,
    write_checksums,
)
from gptlab.model import GPT

if TYPE_CHECKING:
    from gptlab.tokenizer import Tokenizer

CHECKPOINTS_DIR = "checkpoints"
SHARDED_DIR = "dcp"
"""Where a sharded training checkpoint keeps its torch.distributed.checkpoint files (gptlab.train.sharded)."""
_STEP_DIR = re.compile(r"^step_(\d+)$")


def write_model_files(
    model: GPT, directory: Path, tokenizer: Tokenizer | None = None, extra: dict[str, Any] | None = None
) -> None:
    """Write config.json, model.safetensors (and tokenizer/) into an existing directory, and
    checksums.json recording them and any files already in tokenizer/."""
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    config = {"format": "gptlab", "model": model.config.to_dict(), **(extra or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(state_dict_for_save(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)
    tokenizer_files = [p for p in (directory / TOKENIZER_DIR).rglob("*") if p.is_file()]
    write_checksums(directory, [directory / CONFIG_FILE, directory / WEIGHTS_FILE, *tokenizer_files])


def save_model(
    model: GPT, out_dir: str | Path, tokenizer: Tokenizer | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Save a loadable checkpoint directory atomically; returns its path."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_model_files(model, tmp, tokenizer, extra)
    return out_dir


# ---- locate -------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / CONFIG_FILE).is_file() and _has_weights(p)]


def _has_weights(directory: Path) -> bool:
    return (directory / WEIGHTS_FILE).is_file() or is_sharded(directory)


def is_sharded(directory: str | Path) -> bool:
    """Whether `directory` is a complete sharded (DCP) training checkpoint: DCP writes `.metadata` last."""
    return (Path(directory) / SHARDED_DIR / ".metadata").is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint, run directory, or a file inside one."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass a gptlab run or checkpoint directory, a Hugging Face GPT-2 directory, "
            "or a Hugging Face Hub id as org/name (e.g. openai-community/gpt2)"
        )
    # A run directory's own config.json is its train config: its newest checkpoint comes first.
    steps = list_checkpoints(path)
    if steps:
        return steps[-1]
    if (path / CONFIG_FILE).is_file():
        return path
    raise FileNotFoundError(
        f"{path} holds no {CONFIG_FILE} and no {CHECKPOINTS_DIR}/step_* checkpoint; pass a gptlab run or "
        "checkpoint directory, or a Hugging Face GPT-2 directory (config.json + model.safetensors)"
    )


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint (verified against checksums.json when it has one) as a JSON object."""
    file = directory / CONFIG_FILE
    verify_checksums(directory, [CONFIG_FILE])
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); the checkpoint is corrupted") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got a {type(config).__name__}; the checkpoint is corrupted")
    return config


def is_hub_name(path: str) -> bool:
    """Whether `path` names a Hugging Face Hub model: an `org/name` id that is not a local path.

    A bare name or a path under an existing local directory (`runs/nano-typo`) is a mistyped local path,
    not a download."""
    if Path(path).exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", path) is None:
        return False
    return not Path(path).parent.exists()


# ---- load ---------------------------------------------------------------------------------------
def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load a gptlab checkpoint / run directory, a Hugging Face GPT-2 directory, or a hub name."""
    if isinstance(path, str) and is_hub_name(path):
        from gptlab.interop.hf import download

        path = download(path)
    directory = resolve_checkpoint(path)
    config = read_config(directory)
    if config.get("format") == "gptlab":
        model = _load_gptlab(directory, config)
    else:
        from gptlab.interop.hf import load_hf_model

        model = load_hf_model(directory)
    check_finite(model.state_dict(), directory)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


def model_config_of(config: dict[str, Any], file: Path) -> ModelConfig:
    """The "model" section of a gptlab config.json, with errors naming the file."""
    section = config.get("model")
    if not isinstance(section, dict):
        raise ValueError(f'{file} has no "model" object (n_layer, n_head, ...); the checkpoint is corrupted')
    try:
        return ModelConfig.from_dict(section)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{file}: "model" is not a valid model config ({e})') from None


def _load_gptlab(directory: Path, config: dict[str, Any]) -> GPT:
    mc = model_config_of(config, directory / CONFIG_FILE)
    with torch.device("meta"):
        model = GPT(mc)
    if not (directory / WEIGHTS_FILE).is_file() and is_sharded(directory):
        # A sharded training checkpoint: read whole in this process (`gptlab convert --from-dcp` writes
        # the single file once, for repeated loads of a large model).
        state = read_sharded_full(directory)[0]
    else:
        verify_checksums(directory, [WEIGHTS_FILE])
        state = read_safetensors(directory / WEIGHTS_FILE)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_FILE} does not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, assign=True, strict=True)
    return model


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved with a checkpoint or run (tokenizer/ inside it, or the directory itself), or a
    hub model's (as `load_model` takes hub names)."""
    from gptlab.tokenizer import Tokenizer

    if isinstance(path, str) and is_hub_name(path):
        from gptlab.interop.hf import download

        path = download(path)
    path = Path(path)
    candidates = [path / TOKENIZER_DIR, path]
    with contextlib.suppress(FileNotFoundError):
        ckpt = resolve_checkpoint(path)
        candidates = [ckpt / TOKENIZER_DIR, ckpt, *candidates]
    for c in candidates:
        if c.is_dir() and any((c / f).is_file() for f in Tokenizer.KNOWN_FILES):
            if c.name == TOKENIZER_DIR:
                verify_checksums(c.parent, [TOKENIZER_DIR])
            return Tokenizer.from_pretrained(c)
    raise FileNotFoundError(
        f"no tokenizer found in {path} (looked in {', '.join(str(c) for c in candidates)}); "
        "pass --tokenizer DIR with encoder.json + vocab.bpe, vocab.json + merges.txt or tokenizer.json"
    )


# ---- sharded (DCP) training checkpoints, read whole in one process --------------------------------
def read_sharded_full(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Full (unsharded) model and optimizer state dicts of a sharded checkpoint, in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(dir=directory.parent) as scratch:
        file = Path(scratch) / "state.pt"
        dcp_to_torch_save(str(directory / SHARDED_DIR), str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    model_sd, optim_sd = state["model"], state.get("optim")
    for sd in (model_sd, optim_sd or {}):
        sharded_storage_form(sd)
    return model_sd, optim_sd


def sharded_storage_form(state: dict[str, Any]) -> None:
    """A whole model / optimizer state dict read from a sharded checkpoint, in place, back in the
    single-file form: c_attn weights (3, C, C_in) -> (3C, C_in) (the sharded form, in which each rank's
    shard is one box whatever the parallel layout, is `gptlab.train.tensor_parallel.to_storage`'s)."""

    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[2]) if t.dim() == 3 else t

    for key in state:
        if key.endswith("attn.c_attn.weight"):
            state[key] = whole(state[key])
    for key, slots in state.get("state", {}).items():
        if key.endswith("attn.c_attn.weight"):
            for name, value in slots.items():
                if isinstance(value, torch.Tensor):
                    slots[name] = whole(value)
