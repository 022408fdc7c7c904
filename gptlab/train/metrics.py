"""Training metrics: metrics.jsonl (and the optional loggers), loss.png, and the peak FLOP/s behind MFU."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
EVAL_TASKS_PLOT = "eval_tasks.png"


@functools.cache
def measured_matmul_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", seconds: float = 0.3) -> float:
    """Best FLOP/s of a 1024-square matmul in nn.Linear's layout (x @ W.T) on `device` over about
    `seconds` (cached per process). The layout matters: CPUs without native bf16 run x @ W ten times
    slower than x @ W.T in bf16."""
    n = 1024
    gen = torch.Generator(device).manual_seed(0)  # leave the global RNG (dropout, resume) untouched
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    F.linear(a, b)  # warm-up: kernel selection, page faults
    sync()
    best, deadline = float("inf"), time.perf_counter() + seconds
    for i in range(100):
        t = time.perf_counter()
        F.linear(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
        if i >= 2 and time.perf_counter() > deadline:
            break
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype, configured: float | None = None) -> float:
    """Peak FLOP/s for MFU: the configured value, a table entry for known GPUs, else measured."""
    if configured:
        return float(configured)
    if device.type == "cuda":
        from gptlab.reports.sizing import match_device

        # Datasheet peaks (one table, shared with `gptlab compare`). fp32 counts the plain fp32 figure,
        # not TF32 tensor cores, to stay conservative.
        known = match_device(torch.cuda.get_device_name(device))
        if known is not None:
            peak = known.peak_flops if dtype in (torch.bfloat16, torch.float16) else known.peak_flops_fp32
            if peak:
                return peak
        return measured_matmul_flops(dtype, str(device))
    return measured_matmul_flops(dtype, "cpu")


class MetricsLogger:
    """Writes one JSON object per row to metrics.jsonl, passes each row to the `train.loggers` asked
    for (TensorBoard, W&B, MLflow: gptlab.train.loggers), and draws loss.png on request."""

    def __init__(
        self,
        run_dir: Path,
        loggers: Sequence[str] = ("tensorboard",),
        resume_step: int | None = None,
        config: dict[str, Any] | None = None,
        project: str = "gptlab",
        mlflow_tracking_uri: str | None = None,
    ) -> None:
        """`config`: the run's resolved config, logged as hyperparameters where the logger keeps them."""
        from gptlab.train.loggers import open_loggers

        self.run_dir = run_dir
        self.file = run_dir / METRICS_FILE
        self.loggers = open_loggers(loggers, run_dir, config, project, mlflow_tracking_uri, resume_step is not None)
        if resume_step is not None and self.file.is_file():
            # Rows past the resumed checkpoint belong to the interrupted session and will be redone.
            kept = [r for r in read_metrics(self.file) if r.get("step", 0) <= resume_step]
            self.file.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.file.is_file():
            self.file.unlink()
        self._fh = open(self.file, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def log(self, row: dict[str, Any]) -> None:
        from gptlab.train.loggers import scalar_tags

        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self.loggers:
            scalars = scalar_tags(row)
            for logger in self.loggers:
                logger.log(row["step"], scalars)

    def plot(self) -> Path | None:
        """loss.png, and eval_tasks.png once `train.eval_tasks` scores have been logged."""
        from gptlab.reports.plots import plot_eval_tasks

        if self.file.is_file():
            plot_eval_tasks(read_metrics(self.file), self.run_dir / EVAL_TASKS_PLOT)
        return plot_loss(self.file, self.run_dir / LOSS_PLOT)

    def close(self) -> None:
        self._fh.close()
        for logger in self.loggers:
            logger.close()


def read_metrics(file: Path) -> list[dict[str, Any]]:
    rows = []
    for line in file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
    return rows


def plot_loss(metrics_file: Path, out: Path) -> Path | None:
    """Training and validation loss against tokens seen, as a PNG (matplotlib's Agg backend)."""
    if not metrics_file.is_file():
        return None
    rows = read_metrics(metrics_file)
    train = [(r["tokens"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from gptlab.checkpoint import atomic_write_bytes

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"{metrics_file.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out, buf.getvalue())
    return out


class Throughput:
    """Tokens per second of training since the last reading, pauses (evaluation, checkpoints) left out."""

    def __init__(self) -> None:
        self.mark, self.tokens = time.perf_counter(), 0

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.tokens / max(now - self.mark, 1e-9)
        self.mark, self.tokens = now, 0
        return r

    def pause(self, seconds: float) -> None:
        self.mark += seconds  # evaluation and checkpoints are not training throughput


def progress_postfix(row: dict[str, Any]) -> dict[str, str]:
    out = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
    if row.get("mfu") is not None:
        out["mfu"] = f"{100 * row['mfu']:.1f}%"
    if row.get("val_loss") is not None:
        out["val"] = f"{row['val_loss']:.3f}"
    if row.get("reward") is not None:
        out["reward"] = f"{row['reward']:.3f}"
    return out
