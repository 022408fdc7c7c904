"""`train.loggers`: W&B (offline) and MLflow (a file store) receive exactly what metrics.jsonl holds,
plus the run's config; `train.tensorboard` keeps working as a switch onto `train.loggers`."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest

from gptlab.train.config import TrainConfig, load_train_config
from tests.test_train import _train, make_dataset, tiny_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("data"))


def expected_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as (step, value) series under the loggers' names."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault("val/loss" if key == "val_loss" else f"train/{key}", []).append((row["step"], value))
    return series


# ---- the config switch ---------------------------------------------------------------------------
def test_tensorboard_switch_maps_onto_loggers(tmp_path: Path):
    assert TrainConfig().train.loggers == ["tensorboard"]
    assert load_train_config(None, {"train.tensorboard": "false"}).train.loggers == []
    both = load_train_config(None, {"train.loggers": "wandb,mlflow", "train.tensorboard": "true"})
    assert both.train.loggers == ["tensorboard", "wandb", "mlflow"] and both.train.tensorboard is None
    file = tmp_path / "old.toml"  # a config written before train.loggers existed
    file.write_text('[train]\ntensorboard = false\nloggers = ["tensorboard", "mlflow"]\n')
    assert load_train_config(file).train.loggers == ["mlflow"]
    cfg = load_train_config(None, {"train.loggers": "mlflow,wandb,mlflow"})
    cfg.save(tmp_path / "config.json")
    assert load_train_config(tmp_path / "config.json") == cfg and cfg.train.loggers == ["mlflow", "wandb"]
    with pytest.raises(ValueError, match=r"unknown logger\(s\) \['neptune'\].*'wandb'"):
        load_train_config(None, {"train.loggers": "tensorboard,neptune"})


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_missing_logger_names_its_extra(name: str, tmp_path: Path, monkeypatch):
    import sys

    from gptlab.train.metrics import MetricsLogger

    monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    with pytest.raises(ImportError, match=rf"pip install 'gptlab\[{name}\]'"):
        MetricsLogger(tmp_path, [name])
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing started before the error


# ---- the loggers, offline ------------------------------------------------------------------------
def wandb_records(run_dir: Path) -> list:
    """The records of the offline run's .wandb file: LevelDB-style log blocks of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    (file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(file).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_and_mlflow_file_store_get_the_metrics_and_config(dataset, tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    uri = (tmp_path / "mlruns").as_uri()
    run = tmp_path / "run"
    over = {"train.max_steps": 6, "train.eval_interval": 3, "train.loggers": "wandb,mlflow"}
    cfg = tiny_config(dataset, run, **over, **{"train.mlflow_tracking_uri": uri, "train.project": "loggers-test"})
    _train(cfg)
    expected = expected_scalars(run)
    assert len(expected["train/loss"]) == 6 and len(expected["val/loss"]) == 2 and "train/time" in expected
    ids = json.loads((run / "loggers.json").read_text())

    # W&B: history rows and the run config, read back from the offline run file.
    logged: dict[str, list[tuple[int, float]]] = {}
    config = {}
    for record in wandb_records(run):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    logged.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
        elif kind == "run":
            assert record.run.run_id == ids["wandb"] and record.run.project == "loggers-test"
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    assert logged == expected  # every value, exact: JSON doubles keep `time`'s full precision
    assert config["optim"]["lr"] == 3e-3 and config["model"]["n_embd"] == 32 and config["train"]["max_steps"] == 6

    # MLflow: metric histories and params from the file store.
    client = MlflowClient(tracking_uri=uri)
    mlflow_run = client.get_run(ids["mlflow"])
    assert mlflow_run.info.run_name == "run" and mlflow_run.info.status == "FINISHED"
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "loggers-test"
    for tag, series in expected.items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], tag))
        assert history == series, tag
    params = mlflow_run.data.params
    assert params["optim.lr"] == "0.003" and params["model.n_embd"] == "32" and params["train.loggers"] == str(
        ["wandb", "mlflow"]
    )


def test_mlflow_resumed_run_continues_the_same_run(dataset, tmp_path: Path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    run = tmp_path / "run"
    over = {"train.loggers": "mlflow", "train.mlflow_tracking_uri": uri, "train.checkpoint_interval": 4}
    _train(tiny_config(dataset, run, **over, **{"train.max_steps": 4}))
    first = json.loads((run / "loggers.json").read_text())["mlflow"]
    _train(tiny_config(dataset, run, **over, **{"train.max_steps": 8}), resume=True)
    assert json.loads((run / "loggers.json").read_text())["mlflow"] == first
    client = MlflowClient(tracking_uri=uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(first, "train/loss"))
    assert history == expected_scalars(run)["train/loss"] and [s for s, _ in history] == list(range(1, 9))
    assert len(client.search_runs([client.get_run(first).info.experiment_id])) == 1


def test_tensorboard_gets_the_config_as_text(tmp_path: Path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    from gptlab.train.metrics import MetricsLogger

    config = {"optim": {"lr": 0.25}, "train": {"max_steps": 7}}
    logger = MetricsLogger(tmp_path, ["tensorboard"], config=config)
    logger.log({"step": 1, "loss": 2.5})
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    (event,) = acc.Tensors("config/text_summary")
    text = make_ndarray(event.tensor_proto).item().decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```")) == config
    assert [float(make_ndarray(e.tensor_proto)) for e in acc.Tensors("train/loss")] == [2.5]


def test_wandb_without_an_api_key_says_how_to_log_offline(tmp_path: Path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from gptlab.train.metrics import MetricsLogger

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "run").mkdir()
    wandb.teardown()  # forget the settings an earlier (offline) run left in this process
    with pytest.raises(ValueError, match=r"could not start: .*WANDB_MODE=offline"):
        MetricsLogger(tmp_path / "run", ["wandb"])
