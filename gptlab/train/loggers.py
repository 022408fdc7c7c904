"""Where training metrics go besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow (`train.loggers`).

Each is an optional extra, imported when a run asks for it. Every logger receives the rows that
metrics.jsonl holds, under the same names (`train/<key>`, `val/loss`) and the row's `step`, and the
run's resolved config once at the start (TensorBoard: a text summary; W&B: the run config; MLflow:
params). A resumed run continues the same W&B / MLflow run: their ids are kept in RUN_DIR/loggers.json.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

LOGGERS = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "loggers.json"


class Logger(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def check_logger_names(names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise ValueError(
            f"train.loggers: unknown logger(s) {unknown}; give a list from {list(LOGGERS)} "
            "(on the command line: --train.loggers tensorboard,wandb)"
        )


def scalar_tags(row: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics row under their logger names (the step and None left out)."""
    out = {}
    for key, value in row.items():
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
            # keys with a "/" (`eval/<task>` of train.eval_tasks) are tags already
            out[key if "/" in key else f"train/{key}" if key != "val_loss" else "val/loss"] = value
    return out


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 6e-4}} -> {'optim.lr': 6e-4}: the keys `gptlab train --optim.lr` takes."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten_config(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _missing(package: str, extra: str, error: ImportError) -> ImportError:
    return ImportError(
        f"train.loggers asks for {package}, which is not installed ({error}); "
        f"pip install 'gptlab[{extra}]', or remove {package!r} from train.loggers"
    )


class TensorBoardLogger:
    def __init__(self, writer: Any, config: dict[str, Any] | None) -> None:
        self.writer = writer
        if config is not None:
            self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            # Double precision: `time` (seconds since 1970) in float32 is off by up to 64 s.
            self.writer.add_scalar(tag, value, step, new_style=True, double_precision=True)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run in RUN_DIR/wandb; WANDB_MODE=offline keeps it on disk (`wandb sync` uploads it later)."""

    def __init__(self, run_dir: Path, config: dict[str, Any] | None, project: str, run_id: str | None) -> None:
        try:
            import wandb
        except ImportError as e:
            raise _missing("wandb", "wandb", e) from None
        try:
            self.run = wandb.init(
                project=project,
                name=run_dir.name,
                dir=str(run_dir),
                config=config,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(console="off"),  # leave the progress bar and warnings on the terminal
            )
        except Exception as e:  # no API key, no network: say how to log anyway
            raise ValueError(
                f"Weights & Biases logging could not start: {e}; run `wandb login` (or set WANDB_API_KEY), "
                "or set WANDB_MODE=offline to keep the run on disk and `wandb sync` it later"
            ) from None
        self.id = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    """An MLflow run under experiment `project`, through MlflowClient (no process-global active run)."""

    def __init__(
        self, run_dir: Path, config: dict[str, Any] | None, project: str, tracking_uri: str | None, run_id: str | None
    ) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise _missing("mlflow", "mlflow", e) from None
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            if run_id is None:
                experiment = self.client.get_experiment_by_name(project)
                experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
                run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
                params = [Param(k, str(v)[:6000]) for k, v in flatten_config(config or {}).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                    self.client.log_batch(run_id, params=params[i : i + 100])
            else:
                self.client.update_run(run_id, status="RUNNING")
        except Exception as e:  # the store is the user's: say which one failed and how to choose another
            where = tracking_uri or "MLflow's default (MLFLOW_TRACKING_URI unset)"
            raise ValueError(
                f"MLflow logging could not start with tracking URI {where}: {e}; set train.mlflow_tracking_uri "
                "(or MLFLOW_TRACKING_URI) to a server or store, e.g. sqlite:///mlflow.db"
            ) from None
        self.id = run_id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(value), now, step) for tag, value in scalars.items()]
        self.client.log_batch(self.id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.id)


def _tensorboard(run_dir: Path, config: dict[str, Any] | None) -> TensorBoardLogger | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # on by default: say so once rather than skip silently, and train on
        print(
            "gptlab: warning: TensorBoard logging skipped: tensorboard is not installed "
            "(pip install 'gptlab[tensorboard]', or leave 'tensorboard' out of train.loggers)",
            file=sys.stderr,
        )
        return None
    return TensorBoardLogger(SummaryWriter(str(run_dir / "tensorboard")), config)


def open_loggers(
    names: Sequence[str],
    run_dir: Path,
    config: dict[str, Any] | None = None,
    project: str = "gptlab",
    mlflow_tracking_uri: str | None = None,
    resuming: bool = False,
) -> list[Logger]:
    """The loggers `names` asks for. A resumed run reopens the W&B / MLflow runs recorded in loggers.json."""
    check_logger_names(names)
    ids_file = run_dir / IDS_FILE
    ids = json.loads(ids_file.read_text()) if resuming and ids_file.is_file() else {}
    opened: list[Logger] = []
    try:
        for name in dict.fromkeys(names):
            if name == "tensorboard":
                tb = _tensorboard(run_dir, config)
                if tb is not None:
                    opened.append(tb)
            elif name == "wandb":
                opened.append(WandbLogger(run_dir, config, project, ids.get("wandb")))
                ids["wandb"] = opened[-1].id
            else:
                opened.append(MlflowLogger(run_dir, config, project, mlflow_tracking_uri, ids.get("mlflow")))
                ids["mlflow"] = opened[-1].id
    except BaseException:
        for logger in opened:
            logger.close()
        raise
    if ids:
        from gptlab.checkpoint import atomic_write_text

        atomic_write_text(ids_file, json.dumps(ids, indent=2) + "\n")
    return opened
