"""Training checkpoints: the loadable model files plus the state to resume, in one atomic directory.

checkpoints/step_00000040/ holds config.json + model.safetensors (+ tokenizer/) exactly as
`gptlab.checkpoint.save_model` writes them, and beside them:
  train_state.json         step, data position, tokens, optimizer hyper-parameters, RNG scalars
  train_state.safetensors  optimizer moments ("optimizer/<param>/<key>") and RNG state tensors
  checksums.json           the SHA-256 of each file above, verified when the checkpoint is read
No pickle: resuming reads JSON and safetensors only. The directory is written under a temporary name
and renamed into place, so a crash mid-write leaves the previous checkpoint intact (and a `.tmp-step_*`
folder, removed by `clean_interrupted_writes` at the next start).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gptlab.checkpoint import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    SHARDED_DIR,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    atomic_dir,
    check_finite,
    is_sharded,
    list_checkpoints,
    model_config_of,
    read_config,
    read_safetensors,
    verify_checksums,
    write_checksums,
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
    with atomic_dir(directory) as tmp:
        write_state_files(tmp, model_config, model_sd, optim_sd, state, rng, tokenizer, extra)
    return directory


def write_state_files(
    directory: Path,
    model_config: ModelConfig,
    model_sd: dict[str, torch.Tensor] | None,
    optim_sd: dict[str, Any] | None,
    state: TrainState,
    rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
    tokenizer: Tokenizer | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """The files of a checkpoint, written into an existing (temporary) directory with checksums.json.
    `model_sd` None: a sharded checkpoint, whose weights and optimizer state sit in `SHARDED_DIR`
    (gptlab.train.sharded writes them); then this writes config, tokenizer, train state and RNG only."""
    from safetensors.torch import save_file

    config = {"format": "gptlab", "model": model_config.to_dict(), **(extra or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    written = [directory / CONFIG_FILE, directory / STATE_TENSORS, directory / STATE_JSON]
    if model_sd is not None:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model_sd.items()}
        save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        written.append(directory / WEIGHTS_FILE)
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)
        written += [p for p in (directory / TOKENIZER_DIR).rglob("*") if p.is_file()]
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"version": STATE_VERSION, "state": asdict(state), "rng": [], "sharded": model_sd is None}
    if optim_sd is not None:
        optim_tensors, meta["optimizer"] = _flatten_optimizer(optim_sd)
        tensors.update(optim_tensors)
    for rank, (rng_tensors, rng_scalars) in enumerate(rng):
        tensors.update({f"rng/{rank}/{k}": v.contiguous() for k, v in rng_tensors.items()})
        meta["rng"].append(rng_scalars)
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=2))
    write_checksums(directory, written)


@dataclass
class LoadedCheckpoint:
    directory: Path
    model_sd: dict[str, torch.Tensor] | None
    optim_sd: dict[str, Any] | None
    state: TrainState
    rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]
    sharded: bool = False
    """Weights and optimizer state are DCP shards in `directory / SHARDED_DIR` (model_sd, optim_sd None)."""


def read_checkpoint(directory: Path) -> LoadedCheckpoint:
    """Read what `write_checkpoint` wrote, verified (checksums, finite tensors); errors name the file."""
    if not has_train_state(directory):
        raise FileNotFoundError(
            f"{directory} has no {STATE_JSON} / {STATE_TENSORS}: it is a model checkpoint, not a resumable one"
        )
    verify_checksums(directory)
    file = directory / STATE_JSON
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is corrupted ({e}); resume from an earlier checkpoint") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} must hold a JSON object, got a {type(meta).__name__}; the checkpoint is corrupted")
    if meta.get("version") != STATE_VERSION:
        raise ValueError(f"{file} has version {meta.get('version')}, expected {STATE_VERSION}")
    model_config_of(read_config(directory), directory / CONFIG_FILE)
    tensors = read_safetensors(directory / STATE_TENSORS)
    sharded = bool(meta.get("sharded"))
    if sharded and not is_sharded(directory):
        raise ValueError(f"{directory / SHARDED_DIR} has no .metadata: the sharded checkpoint is incomplete")
    model_sd = None if sharded else read_safetensors(directory / WEIGHTS_FILE)
    if model_sd is not None:
        check_finite(model_sd, directory / WEIGHTS_FILE)
    check_finite(tensors, directory / STATE_TENSORS)
    try:
        optim_sd = _unflatten_optimizer(tensors, meta["optimizer"]) if "optimizer" in meta else None
        rng = []
        for rank, scalars in enumerate(meta["rng"]):
            prefix = f"rng/{rank}/"
            rng.append(({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, scalars))
        state = TrainState(**meta["state"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(
            f"{file} is corrupted: {type(e).__name__} {e} while reading it; resume from an earlier checkpoint"
        ) from None
    return LoadedCheckpoint(directory, model_sd, optim_sd, state, rng, sharded)


def read_newest_good(run_dir: Path) -> LoadedCheckpoint | None:
    """The newest resumable checkpoint of `run_dir` that reads back intact; newer ones that do not are
    skipped with a warning naming them. None when the run has no resumable checkpoint."""
    candidates = [c for c in reversed(list_checkpoints(run_dir)) if has_train_state(c)]
    for checkpoint in candidates:
        try:
            return read_checkpoint(checkpoint)
        except (ValueError, FileNotFoundError) as e:
            warnings.warn(f"skipping checkpoint {checkpoint}: {e}", stacklevel=2)
    if candidates:
        raise ValueError(
            f"none of the {len(candidates)} checkpoints of {run_dir} can be read (see the warnings above); "
            "restore one or start a new run"
        )
    return None


def resume_target(path: Path, step: int | None = None) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from) for `--resume PATH [--step N]`: PATH is a run directory
    (checkpoint None: its newest good one, unless `step` names one) or one of its checkpoint directories."""
    if has_train_state(path):
        if path.parent.name != CHECKPOINTS_DIR:
            raise ValueError(f"{path} is a checkpoint outside a run's {CHECKPOINTS_DIR}/ folder; pass the run")
        if step is not None and checkpoint_dir(path.parent.parent, step) != path:
            raise ValueError(f"--step {step} contradicts the checkpoint {path}; give one of them")
        return path.parent.parent, path
    if step is None:
        return path, None
    checkpoint = checkpoint_dir(path, step)
    if not has_train_state(checkpoint):
        steps = [int(c.name.removeprefix("step_")) for c in list_checkpoints(path) if has_train_state(c)]
        raise FileNotFoundError(f"{path} has no resumable checkpoint at step {step}; its checkpoints: steps {steps}")
    return path, checkpoint


def clean_interrupted_writes(run_dir: Path) -> list[Path]:
    """Remove what a killed `write_checkpoint` left in run_dir/checkpoints; returns what was removed.

    `.tmp-step_*` folders are unfinished writes. An `.old-step_*` folder is a checkpoint moved aside to be
    replaced: it is deleted if its replacement is in place, else moved back.
    """
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".old-step_") and p.is_dir():
            target = root / p.name[len(".old-") :].rsplit("-", 1)[0]
            if not target.exists():
                os.replace(p, target)
                continue
        elif not (p.name.startswith(".tmp-step_") and p.is_dir()):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (0 keeps all); returns the deleted directories."""
    if keep <= 0:
        return []
    old = list_checkpoints(run_dir)[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old
