"""The one training loop. Pretraining and every fine-tuning mode call `train` with their own `Task`.

`train(cfg, model, task, run_dir)`:
  - splits each global batch (`train.batch_size` sequences, optionally ramped) into this rank's slice
    and micro-batches; gradients accumulate so the update equals one single-process step on the whole
    batch, whatever the world size and micro-batch size;
  - AdamW (decay on matrices only), warm-up + cosine schedule, global-norm clipping, bf16 autocast;
  - skips a step whose loss or gradient is not finite, and stops after `max_nonfinite_steps` in a row;
  - validation, metrics.jsonl / TensorBoard / W&B / MLflow / loss.png, atomic checkpoints with the full resume state.
The task decides what trains (`trainable_parameters`), on which batches (`batch`) with which loss
(`loss`); see gptlab/train/task.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as torch_dist
from torch import nn

from gptlab.checkpoint import is_sharded
from gptlab.train import distributed as D
from gptlab.train import tensor_parallel as TP
from gptlab.train.config import TrainConfig
from gptlab.train.eval_tasks import TrainEvalTasks
from gptlab.train.evaluate import autocast, evaluate, resolve_dtype
from gptlab.train.metrics import MetricsLogger, Throughput, peak_flops, progress_postfix
from gptlab.train.optim import build_optimizer, set_lr
from gptlab.train.schedule import batch_size_at, lr_at
from gptlab.train.sharded import ShardedCheckpointer, load_sharded
from gptlab.train.state import (
    LoadedCheckpoint,
    TrainState,
    checkpoint_dir,
    clean_interrupted_writes,
    latest_resumable,
    prune_checkpoints,
    read_checkpoint,
    read_newest_good,
    rng_state,
    set_rng_state,
    write_checkpoint,
    write_state_files,
)
from gptlab.train.task import Task, to_device

if TYPE_CHECKING:
    from gptlab.tokenizer import Tokenizer

RUN_CONFIG = "config.json"


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss or gradient was not finite too many steps in a row."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    loss: float | None
    val_loss: float | None
    checkpoint: Path | None
    stop_reason: str
    """'max_steps', 'time_limit' or 'early_stopping'."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """The metrics rows this session logged (rank 0; empty elsewhere)."""


def _clean_name(name: str) -> str:
    """A parameter's name without the DDP / torch.compile wrapper prefixes."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def train(
    cfg: TrainConfig,
    model: nn.Module,
    task: Task,
    run_dir: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    resume: bool | str | Path = False,
    dist: D.Dist | None = None,
) -> TrainResult:
    """Train `model` on `task` as `cfg.optim` / `cfg.train` say, writing to `run_dir`.

    `resume`: True resumes from the newest resumable checkpoint of `run_dir` that reads back intact
    (skipping newer corrupt ones with a warning; starting fresh if there is none), a run directory from
    its newest good one, a checkpoint directory from exactly that checkpoint. `model` is the plain module
    on any device; the loop moves, wraps (activation checkpointing, compile, DDP / FSDP) and returns
    nothing of it.
    """
    t = cfg.train
    run_dir = Path(run_dir)
    d = dist or D.init_distributed(t.device)
    threads_before = torch.get_num_threads()
    if t.threads:
        torch.set_num_threads(t.threads)
    try:
        return _train(cfg, model, task, run_dir, tokenizer, resume, d)
    finally:
        torch.set_num_threads(threads_before)


def _train(
    cfg: TrainConfig,
    model: nn.Module,
    task: Task,
    run_dir: Path,
    tokenizer: Tokenizer | None,
    resume: bool | str | Path,
    d: D.Dist,
) -> TrainResult:
    t = cfg.train
    device = d.device
    dtype = resolve_dtype(t.dtype, device)

    loaded = None
    if d.is_main:
        for removed in clean_interrupted_writes(run_dir):
            print(f"removed {removed}, left by an interrupted checkpoint write", flush=True)
        loaded = _read_resume(run_dir, resume)
    start_from = D.broadcast_object(d, loaded.directory if loaded else None)
    state = D.broadcast_object(d, loaded.state if loaded else None) or TrainState()
    rng_all = D.broadcast_object(d, loaded.rng if loaded else None)
    if start_from is not None and d.is_main:
        print(f"resuming from {start_from} (step {state.step}, {state.tokens:,} tokens)", flush=True)

    # Frozen parameters are marked before wrapping: DDP and FSDP fix the trainable set at wrap time.
    model.to(device)
    trainable = {n for n, _ in task.trainable_parameters(model)}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    prepare = getattr(task, "prepare_model", None)
    if prepare is not None:
        prepare(model)
    TP.setup_mesh(d, t.tensor_parallel)
    if d.tensor_parallel > 1:
        TP.parallelize(model, d, t.sequence_parallel)
        if d.is_main:
            sp = ", sequence parallel" if t.sequence_parallel else ""
            print(f"tensor parallel {d.tensor_parallel} x data parallel {d.dp_size} (FSDP2){sp}", flush=True)
    if t.activation_checkpointing:
        D.apply_activation_checkpointing(model)
    if t.compile:
        if d.enabled and (t.strategy == "fsdp" or d.tensor_parallel > 1):
            for block in D._blocks(model):
                block.compile()
        else:
            model.compile()
    wrapped = D.wrap_model(model, t.strategy, d)
    params = [(n, p) for n, p in ((_clean_name(n), p) for n, p in wrapped.named_parameters()) if n in trainable]
    optimizer = build_optimizer(wrapped, params, cfg.optim, device)
    if start_from is not None and is_sharded(start_from):
        load_sharded(start_from, wrapped, optimizer)
    elif start_from is not None:
        D.load_full_state(wrapped, optimizer, loaded.model_sd if loaded else {}, loaded.optim_sd if loaded else {}, d)
    del loaded
    # Dropout masks differ across data-parallel replicas and agree within a tensor-parallel group
    # (its ranks hold copies of the replicated activations).
    if rng_all:
        set_rng_state(*rng_all[(d.dp_rank * d.tensor_parallel) % len(rng_all)])
    else:
        torch.manual_seed(t.seed + d.dp_rank)

    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / RUN_CONFIG)
        if tokenizer is not None and not (run_dir / "tokenizer").is_dir():
            tokenizer.save(run_dir / "tokenizer")
    logger = None
    if d.is_main:
        resume_step = state.step if start_from else None
        logger = MetricsLogger(run_dir, t.loggers, resume_step, cfg.to_dict(), t.project, t.mlflow_tracking_uri)
    try:
        return _run(cfg, d, wrapped, model, optimizer, params, task, state, run_dir, dtype, tokenizer, logger)
    finally:
        if logger is not None:
            logger.close()


def _read_resume(run_dir: Path, resume: bool | str | Path) -> LoadedCheckpoint | None:
    if resume is False or resume is None:
        return None
    if resume is True:
        return read_newest_good(run_dir)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} to resume from does not exist")
    return read_newest_good(path) if not (path / "train_state.json").is_file() else read_checkpoint(path)


def _run(
    cfg: TrainConfig,
    d: D.Dist,
    model: nn.Module,
    raw_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[tuple[str, nn.Parameter]],
    task: Task,
    state: TrainState,
    run_dir: Path,
    dtype: torch.dtype,
    tokenizer: Tokenizer | None,
    logger: MetricsLogger | None,
) -> TrainResult:
    from tqdm.auto import tqdm

    t, o = cfg.train, cfg.optim
    device, W = d.device, d.dp_size
    decay_steps = o.decay_steps or t.max_steps
    config = getattr(raw_model, "config", None)
    context = getattr(task, "seq_len", None)
    flops_per_token = config.flops_per_token(context, backward=True) if config is not None else None
    peak = peak_flops(device, dtype, t.peak_flops) * d.world_size if flops_per_token else None
    val_batches = task.validation_batches() if t.eval_interval else []
    eval_tasks = TrainEvalTasks(t, tokenizer, W) if t.eval_tasks and t.eval_interval else None
    # A task may validate by generating (RL) rather than by a loss over fixed batches.
    validates = bool(t.eval_interval) and (bool(val_batches) or getattr(task, "validates_without_batches", False))
    grads = [p for _, p in params]

    bar = tqdm(
        total=t.max_steps,
        initial=state.step,
        disable=not (d.is_main and t.progress),
        dynamic_ncols=True,
        unit="step",
        desc="train",
    )
    timer, session_start = Throughput(), time.perf_counter()
    elapsed_before = state.elapsed
    rows: list[dict[str, Any]] = []
    last_loss: float | None = None
    val_loss: float | None = None
    saved: Path | None = None
    stop_reason = "max_steps"
    sharded = ShardedCheckpointer(d, t.async_checkpoint) if t.checkpoint_format == "dcp" else None
    model.train()

    def checkpoint() -> Path:
        nonlocal saved
        state.elapsed = elapsed_before + time.perf_counter() - session_start
        began = time.perf_counter()
        saved = _save(cfg, d, model, raw_model, optimizer, state, run_dir, tokenizer, sharded)
        timer.pause(time.perf_counter() - began)
        return saved

    def log(row: dict[str, Any]) -> None:
        if logger is not None:
            logger.log(row)
            rows.append(row)

    while state.step < t.max_steps:
        step = state.step
        batch_size = batch_size_at(state.tokens, t.batch_size, t.batch_ramp_start, t.batch_ramp_tokens, W)
        lr = lr_at(step, o.lr, o.warmup_steps, decay_steps, o.min_lr_ratio)
        set_lr(optimizer, lr)
        local = batch_size // W
        first = state.position + d.dp_rank * local
        micro = t.micro_batch_size or local
        starts = list(range(first, first + local, micro))
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        step_tokens = 0
        for k, begin in enumerate(starts):
            indices = range(begin, min(begin + micro, first + local))
            batch = to_device(task.batch(indices), device)
            step_tokens += task.tokens(batch)
            with D.gradient_sync(model, enabled=k == len(starts) - 1), autocast(device, dtype):
                loss = task.loss(model, batch)
            # Each rank's share of the global mean; DDP / FSDP average over ranks, hence the factor W.
            weight = len(indices) / batch_size
            (loss.float() * (weight * W)).backward()
            loss_sum += loss.detach().float() * weight
        # Over every rank; the ranks of a tensor-parallel group hold copies of one replica's figures.
        sums = torch.tensor([float(loss_sum), float(step_tokens)], dtype=torch.float64, device=device)
        D.all_reduce_sum(d, sums)
        sums /= d.tensor_parallel
        loss_value, step_tokens = float(sums[0]), round(float(sums[1]))
        grad_norm = _grad_norm(grads, o.grad_clip) if math.isfinite(loss_value) else float("nan")

        state.step += 1
        state.position += batch_size
        state.tokens += step_tokens
        timer.tokens += step_tokens
        bar.update(1)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            state.nonfinite_in_a_row += 1
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            log(
                {
                    "step": state.step,
                    "skipped": True,
                    "loss": None,
                    "lr": lr,
                    "tokens": state.tokens,
                    "reason": f"non-finite {what}",
                }
            )
            if d.is_main:
                bar.write(
                    f"step {state.step}: non-finite {what}; step skipped "
                    f"({state.nonfinite_in_a_row}/{t.max_nonfinite_steps} in a row)"
                )
            if state.nonfinite_in_a_row >= t.max_nonfinite_steps:
                bar.close()
                D.barrier(d)
                last = saved or latest_resumable(run_dir)
                kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
                raise NonFiniteLossError(
                    f"the {what} was not finite for {state.nonfinite_in_a_row} steps in a row "
                    f"(steps {state.step - state.nonfinite_in_a_row + 1}-{state.step}); training stopped and "
                    f"{kept}. Lower optim.lr, raise optim.warmup_steps, or check the data; "
                    f"resume with `gptlab train --resume {run_dir}`"
                )
            continue
        state.nonfinite_in_a_row = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = loss_value

        done = state.step >= t.max_steps
        if t.time_limit is not None and not done:
            over = time.perf_counter() - session_start > t.time_limit * 60
            flag = D.all_reduce_sum(d, torch.tensor(float(over), device=device))  # rank 0's clock rules all
            if flag.item() > 0:
                done, stop_reason = True, "time_limit"
        evaluate_now = validates and (state.step % t.eval_interval == 0 or done)
        tasks_now = eval_tasks is not None and (state.step % t.eval_interval == 0 or done)
        if state.step % t.log_interval == 0 or done or evaluate_now or tasks_now:
            rate = timer.rate()
            row: dict[str, Any] = {
                "step": state.step,
                "loss": loss_value,
                "lr": lr,
                "tokens": state.tokens,
                "batch_size": batch_size,
                "grad_norm": grad_norm,
                "tokens_per_s": rate,
                "mfu": rate * flops_per_token / peak if peak else None,
                "elapsed": elapsed_before + time.perf_counter() - session_start,
                "time": time.time(),
            }
            if hasattr(task, "train_metrics"):  # e.g. the mean reward of RL rollouts since the last row
                row.update(task.train_metrics())
            if evaluate_now:
                began = time.perf_counter()
                if val_batches:
                    val_loss = evaluate(model, task, val_batches, d, dtype, t.micro_batch_size)
                    row["val_loss"] = val_loss
                    if state.best_val_loss is None or val_loss < state.best_val_loss:
                        state.best_val_loss = val_loss
                if hasattr(task, "validate"):  # task metrics beyond the loss (accuracy, F1, ...)
                    row.update(task.validate(model))
                timer.pause(time.perf_counter() - began)
                improved, stop = _track_best(state, row, t.early_stopping_metric, t.patience)
                if improved and d.is_main and hasattr(task, "on_best"):  # e.g. keep the best weights
                    task.on_best(raw_model, row)
                if stop and not done:
                    done, stop_reason = True, "early_stopping"
            if tasks_now and d.is_main:
                began = time.perf_counter()
                row.update(eval_tasks(raw_model))
                timer.pause(time.perf_counter() - began)
            log(row)
            bar.set_postfix(progress_postfix(row), refresh=False)
            if (evaluate_now or tasks_now) and logger is not None:
                logger.plot()
        if done or (t.checkpoint_interval and state.step % t.checkpoint_interval == 0):
            checkpoint()
        if done:
            break
    else:  # already at max_steps when resuming
        if saved is None and d.is_main:
            saved = latest_resumable(run_dir)
    if sharded is not None and sharded.finish() is not None:  # an asynchronous write still in flight
        D.barrier(d)
    bar.close()
    if logger is not None:
        logger.plot()
    return TrainResult(run_dir, state.step, state.tokens, last_loss, val_loss, saved, stop_reason, rows)


def _track_best(state: TrainState, row: dict[str, Any], metric: str, patience: int) -> tuple[bool, bool]:
    """(improved, stop) after an evaluation: `metric` against the best so far (lower is better for names
    ending in 'loss', higher otherwise); stop once `patience` > 0 evaluations in a row did not improve."""
    if metric not in row:
        found = sorted(k for k in row if k.startswith("val_"))
        raise ValueError(
            f"train.early_stopping_metric {metric!r} is not a validation metric of this task; it reports {found}"
        )
    value, lower = float(row[metric]), metric.endswith("loss")
    best = state.extra.setdefault(
        "early_stopping", {"metric": metric, "best": None, "best_step": None, "evals_without_improvement": 0}
    )
    improved = best["best"] is None or (value < best["best"] if lower else value > best["best"])
    if improved:
        best.update(metric=metric, best=value, best_step=state.step, evals_without_improvement=0)
    else:
        best["evals_without_improvement"] += 1
    return improved, patience > 0 and best["evals_without_improvement"] >= patience


def _grad_norm(grads: list[nn.Parameter], clip: float) -> float:
    """Clip to `clip` (0: measure only) and return the global norm before clipping."""
    return D.clip_grad_norm(grads, clip if clip > 0 else float("inf"))


def _save(
    cfg: TrainConfig,
    d: D.Dist,
    model: nn.Module,
    raw_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    run_dir: Path,
    tokenizer: Tokenizer | None,
    sharded: ShardedCheckpointer | None,
) -> Path:
    """Write a checkpoint (a collective) and prune old ones: DCP shards from every rank, or the full
    state gathered on rank 0."""
    rng = rng_state()
    if d.enabled:
        gathered: list[Any] = [None] * d.world_size
        torch_dist.all_gather_object(gathered, rng)
        rngs = gathered
    else:
        rngs = [rng]
    directory = checkpoint_dir(run_dir, state.step)
    extra = {"step": state.step, "tokens": state.tokens, "train": cfg.to_dict()}
    keep = cfg.train.keep_checkpoints
    if sharded is not None:

        def main_files(tmp: Path) -> None:
            write_state_files(tmp, raw_model.config, None, None, state, rngs, tokenizer, extra)

        return sharded.save(directory, model, optimizer, main_files, lambda: prune_checkpoints(run_dir, keep))
    model_sd, optim_sd = D.full_state(model, optimizer, d)
    if d.is_main:
        write_checkpoint(directory, raw_model.config, model_sd, optim_sd, state, rngs, tokenizer, extra)
        prune_checkpoints(run_dir, keep)
    D.barrier(d)
    return directory
