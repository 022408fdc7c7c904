"""Training checkpoints: the loadable model files plus the state to resume, in one atomic directory.

checkpoints/step_00000040/ holds config.json + model.safetensors (+ tokenizer/) exactly as
`gptlab.checkpoint.save_model` writes them, and beside them:
  train_state.json         step, data position, tokens, optimizer hyper-parameters, RNG scalars
  train_state.safetensors  optimizer moments ("optimizer/<param>/<key>") and RNG state tensors
No pickle: resuming reads JSON and safetensors only. The directory is written under a temporary name
and renamed into place, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gptlab.checkpoint import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    atomic_dir,
    list_checkpoints,
    read_safetensors,
)
from gptlab.config import ModelConfig

if TYPE_CHECKING:
    from gptlab.tokenizer import Tokenizer

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
STATE_VERSION = 1


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that a resumed run needs to continue exactly."""

    step: int = 0
    """Optimizer steps taken (including skipped non-finite ones)."""
    position: int = 0
    """Next global sequence index of the training data."""
    tokens: int = 0
    """Training tokens consumed."""
    elapsed: float = 0.0
    """Training seconds so far, over all sessions."""
    nonfinite_in_a_row: int = 0
    best_val_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"step_{step:08d}"


def has_train_state(directory: Path) -> bool:
    return (directory / STATE_JSON).is_file() and (directory / STATE_TENSORS).is_file()


def latest_resumable(run_dir: Path) -> Path | None:
    for ckpt in reversed(list_checkpoints(run_dir)):
        if has_train_state(ckpt):
            return ckpt
    return None


# ---- RNG ----------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states as (tensors, JSON-able scalars)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    scalars = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    kind, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = scalars["python"]
    random.setstate((version, tuple(internal), gauss))


# ---- optimizer state <-> safetensors + JSON -----------------------------------------------------
def _flatten_optimizer(optim_sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, per_param in optim_sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{name}/{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in optim_sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            name, _, field_name = key[len("optimizer/") :].rpartition("/")
            state.setdefault(name, {})[field_name] = value
    for name, values in meta["scalars"].items():
        state.setdefault(name, {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- save / load --------------------------------------------------------------------------------
def write_checkpoint(
    directory: Path,
    model_config: ModelConfig,
    model_sd: dict[str, torch.Tensor],
    optim_sd: dict[str, Any] | None,
    state: TrainState,
    rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
    tokenizer: Tokenizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write model files and train state into `directory` atomically (rank 0 only).

    `rng` holds every rank's RNG state, rank order. Returns the directory.
    """
    from safetensors.torch import save_file

    with atomic_dir(directory) as tmp:
        config = {"format": "gptlab", "model": model_config.to_dict(), **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model_sd.items()}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"version": STATE_VERSION, "state": asdict(state), "rng": []}
        if optim_sd is not None:
            optim_tensors, meta["optimizer"] = _flatten_optimizer(optim_sd)
            tensors.update(optim_tensors)
        for rank, (rng_tensors, rng_scalars) in enumerate(rng):
            tensors.update({f"rng/{rank}/{k}": v.contiguous() for k, v in rng_tensors.items()})
            meta["rng"].append(rng_scalars)
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2))
    return directory


@dataclass
class LoadedCheckpoint:
    directory: Path
    model_sd: dict[str, torch.Tensor]
    optim_sd: dict[str, Any] | None
    state: TrainState
    rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]


def read_checkpoint(directory: Path) -> LoadedCheckpoint:
    """Read what `write_checkpoint` wrote; errors name the file."""
    if not has_train_state(directory):
        raise FileNotFoundError(
            f"{directory} has no {STATE_JSON} / {STATE_TENSORS}: it is a model checkpoint, not a resumable one"
        )
    try:
        meta = json.loads((directory / STATE_JSON).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / STATE_JSON} is corrupted ({e}); resume from an earlier checkpoint") from None
    if meta.get("version") != STATE_VERSION:
        raise ValueError(f"{directory / STATE_JSON} has version {meta.get('version')}, expected {STATE_VERSION}")
    tensors = read_safetensors(directory / STATE_TENSORS)
    model_sd = read_safetensors(directory / WEIGHTS_FILE)
    optim_sd = _unflatten_optimizer(tensors, meta["optimizer"]) if "optimizer" in meta else None
    rng = []
    for rank, scalars in enumerate(meta["rng"]):
        prefix = f"rng/{rank}/"
        rng.append(({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, scalars))
    return LoadedCheckpoint(directory, model_sd, optim_sd, TrainState(**meta["state"]), rng)


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (0 keeps all); returns the deleted directories."""
    if keep <= 0:
        return []
    old = list_checkpoints(run_dir)[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old
