"""DDP and FSDP2 on CPU (gloo, 2 processes): the same losses as one process with the same global batch,
and a rank-0 checkpoint (FSDP: gathered full state) that loads into a plain model."""

from __future__ import annotations

import json
import os
import socket
import sysconfig
from pathlib import Path

import pytest
import torch

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py"]
STEPS = 4


def make_dataset(root: Path) -> tuple[Path, Path]:
    from gptlab.data.prepare import prepare
    from gptlab.tokenizer import Tokenizer

    files = [STDLIB / n for n in CORPUS]
    tok = Tokenizer.train(files, 300, show_progress=False)
    tok.save(root / "tok")
    prepare(files, root / "ds", tok, val_fraction=0.25, progress=False)
    return root / "ds", root / "tok"


def config(ds: Path, tok: Path, run_dir: Path, strategy: str = "ddp", micro: int | None = 2):
    from gptlab.train.config import load_train_config

    return load_train_config(
        None,
        {
            "model.preset": "nano",
            "model.n_layer": 2,
            "model.n_head": 2,
            "model.n_embd": 32,
            "model.n_ctx": 32,
            "data.dataset": str(ds),
            "data.tokenizer": str(tok),
            "data.seq_len": 32,
            "optim.lr": 3e-3,
            "optim.warmup_steps": 2,
            # 8 sequences: 4 per rank in micro-batches of 2, so accumulation and no_sync are exercised too.
            "train.batch_size": 8,
            "train.micro_batch_size": micro,
            "train.max_steps": STEPS,
            "train.eval_interval": STEPS,
            "train.eval_batches": 3,
            "train.log_interval": 1,
            "train.tensorboard": False,
            "train.progress": False,
            "train.run_dir": str(run_dir),
            "train.dtype": "float32",
            "train.threads": 1,
            "train.strategy": strategy,
        },
    )


def _worker(rank: int, world_size: int, port: int, ds: str, tok: str, root: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    import torch.distributed as dist

    from gptlab.train import distributed as D
    from gptlab.train.pretrain import pretrain

    d = D.init_distributed("cpu")
    try:
        for strategy in ("ddp", "fsdp"):  # one process group for both: start-up is the slow part
            # FSDP without micro-batches: the validation set must still be the single process's (issue 20).
            micro = 2 if strategy == "ddp" else None
            pretrain(config(Path(ds), Path(tok), Path(root) / strategy, strategy, micro), dist=d)
            dist.barrier()
    finally:
        D.shutdown(d)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ddp_and_fsdp_match_single_process(tmp_path: Path):
    import torch.multiprocessing as mp

    from gptlab.checkpoint import list_checkpoints, load_model
    from gptlab.train.pretrain import pretrain

    ds, tok = make_dataset(tmp_path)
    pretrain(config(ds, tok, tmp_path / "single"))
    mp.spawn(_worker, args=(2, _free_port(), str(ds), str(tok), str(tmp_path)), nprocs=2, join=True)

    single = rows(tmp_path / "single")
    single_model = load_model(tmp_path / "single").state_dict()
    for strategy in ("ddp", "fsdp"):
        multi = rows(tmp_path / strategy)
        assert [r["step"] for r in multi] == list(range(1, STEPS + 1))
        # Step 1: the same global batch split over 2 ranks; later steps also check the averaged gradients.
        for a, b in zip(single, multi, strict=True):
            assert abs(a["loss"] - b["loss"]) <= 1e-5, (strategy, a["step"], a["loss"], b["loss"])
            assert b["tokens"] == a["tokens"]
        assert abs(single[-1]["val_loss"] - multi[-1]["val_loss"]) <= 1e-5, strategy
        # Rank 0 wrote one loadable checkpoint with full (gathered) weights.
        assert [p.name for p in list_checkpoints(tmp_path / strategy)] == [f"step_{STEPS:08d}"]
        weights = load_model(tmp_path / strategy).state_dict()
        assert weights.keys() == single_model.keys()
        for k in weights:
            torch.testing.assert_close(weights[k], single_model[k], atol=1e-5, rtol=1e-4, msg=f"{strategy} {k}")


def test_launch_documentation_names_torchrun_flags():
    import gptlab.train.distributed as D

    for flag in ("--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_endpoint"):
        assert flag in D.__doc__
    with pytest.raises(ValueError, match="train.strategy"):
        D.wrap_model(torch.nn.Linear(2, 2), "zero3", D.Dist(world_size=2))


def _eval_task_and_model(ds: Path, eval_batch_size: int):
    from gptlab.config import ModelConfig
    from gptlab.model import GPT
    from gptlab.train.task import LanguageModelingTask

    task = LanguageModelingTask(ds, 32, eval_batch_size=eval_batch_size, eval_batches=3, fused_loss=False)
    torch.manual_seed(0)
    return task, GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=32, vocab_size=300))


def _eval_worker(rank: int, world_size: int, port: int, ds: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    from gptlab.train import distributed as D
    from gptlab.train.evaluate import evaluate

    d = D.init_distributed("cpu")
    try:
        torch.set_num_threads(1)
        found = {}
        # 5 rows: 3 + 2, in passes of 2 (rank 1 pads its second pass); 1 row under FSDP: rank 1 pads.
        for size, strategy, micro in ((5, "ddp", 2), (1, "fsdp", None)):
            task, model = _eval_task_and_model(Path(ds), size)
            wrapped = D.wrap_model(model, strategy, d)
            found[size] = evaluate(wrapped, task, task.validation_batches(), d, torch.float32, micro)
        if d.is_main:
            Path(out).write_text(json.dumps(found))
    finally:
        D.shutdown(d)


def test_validation_loss_does_not_depend_on_world_size(tmp_path: Path):
    """Issue 20: val_loss was 6.929 alone and 6.850 on 2 processes with the same weights."""
    import torch.multiprocessing as mp
    import torch.nn.functional as F

    from gptlab.train import distributed as D
    from gptlab.train.evaluate import evaluate

    ds, _ = make_dataset(tmp_path)
    out = tmp_path / "two.json"
    mp.spawn(_eval_worker, args=(2, _free_port(), str(ds), str(out)), nprocs=2, join=True)
    two = {int(k): v for k, v in json.loads(out.read_text()).items()}
    for size in (5, 1):
        task, model = _eval_task_and_model(ds, size)
        batches = task.validation_batches()
        alone = evaluate(model, task, batches, D.Dist(), torch.float32)
        # Reference: every token of every validation sequence, one mean.
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        with torch.no_grad():
            logits, _ = model(x, y)
        reference = float(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
        assert abs(alone - reference) < 1e-5
        assert abs(two[size] - reference) < 1e-5, (size, two[size], reference)
