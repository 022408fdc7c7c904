"""Sharded training checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards
of model and optimizer state, nothing is gathered on rank 0, and a checkpoint saved on N processes
resumes on M (DCP reshards on load).

checkpoints/step_00000040/ holds, beside config.json, train_state.json, train_state.safetensors (RNG
only) and checksums.json as gptlab.train.state writes them, a `dcp/` folder of DCP files. Atomic as
the single-file format: every rank writes into `.tmp-step_00000040/`, and rank 0 renames it into place
once DCP's `.metadata` is written, which DCP does only after every rank reported its shards. A run
killed mid-save leaves the temporary folder (removed at the next start) and the previous checkpoint.

Asynchronous saving (`train.async_checkpoint`) copies the state to CPU memory and writes it from a
background thread over a separate gloo process group, so training does not wait for the disk; the
checkpoint is published when the write completes (checked before the next save and at the end).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptlab.checkpoint import SHARDED_DIR, atomic_dir, read_sharded_full
from gptlab.config import ModelConfig
from gptlab.files import replace_dir
from gptlab.train import distributed as D
from gptlab.train import tensor_parallel as TP
from gptlab.train.state import read_checkpoint, write_checkpoint, write_state_files

# DCP warns that it "assumes the intent" of a one-process save or load, which is what no_dist says.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """This rank's shards keyed by parameter name (DTensors under FSDP / TP; DCP reshards by name), in
    the live layout (see gptlab.train.tensor_parallel)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, D.optimizers_of(optimizer))
    return state


def _stored_state(state: dict[str, Any], layout: tuple[int, int]) -> dict[str, Any]:
    """`state` as DCP stores it, the same for every layout (c_attn in GPT-2's order, see TP.to_storage);
    `layout`: the model's (n_embd, tensor-parallel size), `TP.qkv_layout`."""
    return {part: TP.to_storage(sd, *layout) for part, sd in state.items()}


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a sharded checkpoint into the (wrapped) model and optimizer; every rank calls it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    live, layout = _state(model, optimizer), TP.qkv_layout(model)
    state = _stored_state(live, layout)
    dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED_DIR), no_dist=not dist.is_initialized())
    state = {part: TP.from_storage(sd, live[part], *layout) for part, sd in state.items()}
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, D.optimizers_of(optimizer), state["optim"])


class ShardedCheckpointer:
    """Writes one run's sharded checkpoints, at most one asynchronous write in flight."""

    def __init__(self, d: D.Dist, async_save: bool = False) -> None:
        self.d = d
        self.async_save = async_save
        self._group: Any = None
        self._pending: tuple[Future | None, Path, Path, Callable[[], None]] | None = None

    def save(
        self,
        directory: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        write_main_files: Callable[[Path], None],
        after: Callable[[], None] = lambda: None,
    ) -> Path:
        """Write `directory` (a collective): rank 0 calls `write_main_files(tmp)` for config, train
        state and tokenizer; `after` runs on rank 0 once the checkpoint is in place (pruning)."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        self.finish()
        tmp = directory.with_name(f".tmp-{directory.name}")
        if self.d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_main_files(tmp)
        D.barrier(self.d)
        state = _stored_state(_state(model, optimizer), TP.qkv_layout(model))
        target = str(tmp / SHARDED_DIR)
        if self.async_save:
            if self.d.enabled and self._group is None:
                self._group = dist.new_group(backend="gloo")  # the background writes' own collectives
            future = dcp.async_save(state, checkpoint_id=target, process_group=self._group, no_dist=not self.d.enabled)
            self._pending = (future, tmp, directory, after)
        else:
            dcp.save(state, checkpoint_id=target, no_dist=not self.d.enabled)
            self._pending = (None, tmp, directory, after)
            self.finish()
            D.barrier(self.d)
        return directory

    def finish(self) -> Path | None:
        """Wait for the write in flight and publish it (rank 0 renames it into place)."""
        if self._pending is None:
            return None
        future, tmp, directory, after = self._pending
        self._pending = None
        if future is not None:
            future.result()  # rank 0's returns once .metadata is written, i.e. after every rank's shards
        if self.d.is_main:
            replace_dir(tmp, directory)
            after()
        return directory


# ---- conversion to and from the single-file checkpoint (`gptlab convert`) ------------------------
def _described(src: Path) -> tuple[ModelConfig, dict[str, Any], Any]:
    """A checkpoint's model config, the rest of its config.json, and its tokenizer (or None)."""
    from gptlab.checkpoint import model_config_of, read_config
    from gptlab.tokenizer import Tokenizer

    config = read_config(src)
    extra = {k: v for k, v in config.items() if k not in ("format", "model")}
    tokenizer = Tokenizer.from_pretrained(src / "tokenizer") if (src / "tokenizer").is_dir() else None
    return model_config_of(config, src / "config.json"), extra, tokenizer


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {out} already exists and is not empty; pass --overwrite to replace it")


def sharded_to_single(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A sharded checkpoint -> the single-file resumable checkpoint (loadable by generate / serve / export)."""
    src, out = Path(src), Path(out)
    _check_out(out, overwrite)
    loaded = read_checkpoint(src)
    if not loaded.sharded:
        raise ValueError(f"{src} is a single-file checkpoint already; `--to-dcp` converts it the other way")
    model_sd, optim_sd = read_sharded_full(src)
    model_config, extra, tokenizer = _described(src)
    return write_checkpoint(out, model_config, model_sd, optim_sd, loaded.state, loaded.rng, tokenizer, extra)


def single_to_sharded(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A single-file resumable checkpoint -> a sharded one (one process writes every shard)."""
    import torch.distributed.checkpoint as dcp

    src, out = Path(src), Path(out)
    _check_out(out, overwrite)
    loaded = read_checkpoint(src)
    if loaded.sharded:
        raise ValueError(f"{src} is a sharded (DCP) checkpoint already; `--from-dcp` converts it to one file")
    model_config, extra, tokenizer = _described(src)
    state: dict[str, Any] = {"model": loaded.model_sd}
    if loaded.optim_sd is not None:
        state["optim"] = loaded.optim_sd
    state = _stored_state(state, (model_config.n_embd, 1))
    with atomic_dir(out) as tmp:
        write_state_files(tmp, model_config, None, None, loaded.state, loaded.rng, tokenizer, extra)
        dcp.save(state, checkpoint_id=str(tmp / SHARDED_DIR), no_dist=True)
    return out
