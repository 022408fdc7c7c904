"""Pretraining setup: resolve the config against the dataset, build the model, call the loop."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gptlab.config import ModelConfig
from gptlab.model import GPT
from gptlab.train import distributed as D
from gptlab.train.config import ModelSection, TrainConfig
from gptlab.train.loop import RUN_CONFIG, TrainResult, train
from gptlab.train.task import LanguageModelingTask

if TYPE_CHECKING:
    from gptlab.tokenizer import Tokenizer


def resolve(cfg: TrainConfig, run_dir: str | None = None) -> TrainConfig:
    """Fill in what the config leaves open: every model field (from the preset and the dataset's
    vocabulary), the sequence length and the run directory. The result reproduces the run alone."""
    from gptlab.data.loader import read_manifest

    manifest = read_manifest(cfg.data.dataset)
    data_vocab = int(manifest["tokenizer"]["vocab_size"])
    model = cfg.model.resolve()
    if cfg.model.vocab_size is None:
        model = dataclasses.replace(model, vocab_size=data_vocab)
    elif model.vocab_size < data_vocab:
        raise ValueError(
            f"model.vocab_size {model.vocab_size} is smaller than the vocabulary of {cfg.data.dataset} "
            f"({data_vocab} ids); leave model.vocab_size unset to use {data_vocab}"
        )
    seq_len = cfg.data.seq_len or model.n_ctx
    if seq_len > model.n_ctx:
        raise ValueError(f"data.seq_len {seq_len} exceeds the model context n_ctx={model.n_ctx}")
    run = run_dir or cfg.train.run_dir or f"runs/{model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return dataclasses.replace(
        cfg,
        model=ModelSection.of(model),
        data=dataclasses.replace(cfg.data, seq_len=seq_len),
        train=dataclasses.replace(cfg.train, run_dir=str(run)),
    )


def build_model(config: ModelConfig, seed: int) -> GPT:
    """GPT-2 initialisation from `seed`: every rank builds the same weights."""
    torch.manual_seed(seed)
    return GPT(config)


def load_data_tokenizer(cfg: TrainConfig) -> Tokenizer | None:
    """The tokenizer named by data.tokenizer, checked against the one the dataset was made with."""
    if cfg.data.tokenizer is None:
        return None
    from gptlab.data.loader import read_manifest
    from gptlab.tokenizer import Tokenizer

    path = Path(cfg.data.tokenizer)
    if not path.exists():
        raise FileNotFoundError(f"data.tokenizer {path} does not exist")
    tokenizer = Tokenizer.from_pretrained(path)
    expected = read_manifest(cfg.data.dataset)["tokenizer"]["fingerprint"]
    if tokenizer.fingerprint() != expected:
        raise ValueError(
            f"data.tokenizer {path} (fingerprint {tokenizer.fingerprint()}) is not the tokenizer "
            f"{cfg.data.dataset} was prepared with ({expected}); point data.tokenizer at that one"
        )
    return tokenizer


def pretrain(cfg: TrainConfig, *, resume: bool | str | Path = False, dist: D.Dist | None = None) -> TrainResult:
    """Pretrain a GPT on `cfg.data.dataset` into `cfg.train.run_dir` (resolved first)."""
    d = dist or D.init_distributed(cfg.train.device)
    try:
        cfg = resolve(cfg)
        cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, run_dir=D.broadcast_object(d, cfg.train.run_dir))
        )  # one timestamp for every rank
        run_dir = Path(cfg.train.run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"train.run_dir {run_dir} is a file, not a directory; choose another --run-dir")
        # Every rank checks (the run directory is on shared storage), so all of them stop together.
        if not resume and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            raise ValueError(
                f"run directory {run_dir} already holds checkpoints; pass --resume to continue it, "
                "or choose another train.run_dir"
            )
        tokenizer = load_data_tokenizer(cfg)
        model_config = cfg.model.resolve()
        task = LanguageModelingTask(
            cfg.data.dataset,
            cfg.data.seq_len,
            seed=cfg.data.seed,
            # Global batches: the validation sequences depend on neither the world size (issue 20) nor
            # the micro-batch; evaluation splits them over ranks and micro-batches.
            eval_batch_size=cfg.train.batch_size,
            eval_batches=cfg.train.eval_batches,
            fused_loss=cfg.train.fused_loss,
        )
        if task.vocab_size > model_config.vocab_size:
            raise ValueError(f"dataset vocabulary {task.vocab_size} exceeds model.vocab_size {model_config.vocab_size}")
        model = build_model(model_config, cfg.train.seed)
        if d.is_main:
            n = model.num_params()
            print(f"model {model_config.name}: {n / 1e6:.2f}M parameters; run directory {run_dir}", flush=True)
        return train(cfg, model, task, run_dir, tokenizer=tokenizer, resume=resume, dist=d)
    finally:
        if dist is None:
            D.shutdown(d)


def config_of_run(run_dir: str | Path) -> Path:
    """The config.json a run directory was trained with (for `gptlab train --resume RUN_DIR`)."""
    file = Path(run_dir) / RUN_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: {run_dir} is not a gptlab training run directory")
    return file
