"""Tensor parallelism (`train.tensor_parallel`) on CPU with gloo: TP 2 and TP 2 x DP 2 give a single
process's losses with the same global batch, dense and banded layers, with and without sequence
parallelism; checkpoints (whole and DCP) saved under one layout resume under another."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_distributed import _free_port, make_dataset, rows
from test_sharded_checkpoint import STEPS, assert_same_losses, dcp_config, launch, resume_copy

BANDED = {"model.attn_pattern": "alternating", "model.local_window": 8}


def _worker(rank: int, world: int, port: int, jobs_json: str) -> None:
    """Run several (config, resume) jobs in one process group: its start-up is the slow part."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    import torch.distributed as dist

    from gptlab.train import distributed as D
    from gptlab.train.config import TrainConfig
    from gptlab.train.pretrain import pretrain

    d = D.init_distributed("cpu")
    try:
        for cfg, resume in json.loads(jobs_json):
            pretrain(TrainConfig.from_dict(cfg), resume=Path(resume) if resume else False, dist=d)
            dist.barrier()
    finally:
        D.shutdown(d)


def run_jobs(world: int, jobs: list[tuple]) -> None:
    import torch.multiprocessing as mp

    payload = json.dumps([(cfg.to_dict(), str(resume) if resume else None) for cfg, resume in jobs])
    mp.spawn(_worker, args=(world, _free_port(), payload), nprocs=world, join=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def assert_matches_single(single: Path, multi: Path) -> None:
    from gptlab.checkpoint import load_model

    a, b = rows(single), rows(multi)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5, (multi.name, x["step"], x["loss"], y["loss"])
        assert x["tokens"] == y["tokens"]
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= 1e-5
    if (single / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors").exists():
        ours, theirs = load_model(single).state_dict(), load_model(multi).state_dict()
        for k in ours:  # whole checkpoints come back in GPT-2's layout (c_attn rows [q; k; v])
            torch.testing.assert_close(theirs[k], ours[k], atol=1e-5, rtol=1e-4, msg=f"{multi.name} {k}")


def test_qkv_order_puts_each_ranks_heads_together():
    from gptlab.train.tensor_parallel import canonical, qkv_order

    C, tp = 8, 2
    grouped = torch.arange(3 * C)[qkv_order(C, tp)]  # canonical rows: q 0-7, k 8-15, v 16-23
    assert grouped.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    w = torch.randn(3 * C, 5)
    torch.testing.assert_close(canonical(canonical(w, C, tp, inverse=True), C, tp), w)


def test_tp2_matches_one_process_and_whole_checkpoints_cross_layouts(tmp_path: Path, data):
    """TP 2 (dense; banded with sequence parallelism) = one process; a one-process checkpoint resumes
    under TP 2 and a TP 2 checkpoint in one process, with the uninterrupted run's losses."""
    from test_distributed import config

    from gptlab.config import apply_overrides
    from gptlab.train.pretrain import pretrain

    ds, tok = data

    def cfg(name: str, tp: int = 1, **extra):
        every = {"train.tensor_parallel": tp, "train.eval_interval": STEPS, "train.checkpoint_interval": 2}
        return apply_overrides(config(ds, tok, tmp_path / name), {**every, **extra})

    pretrain(cfg("single"))
    pretrain(cfg("banded", **BANDED))
    pretrain(cfg("muon", **{"optim.name": "muon"}))
    run_jobs(
        2,
        [
            (cfg("tp2", 2), None),
            (cfg("tp2-muon", 2, **{"optim.name": "muon"}), None),
            (cfg("tp2-sp-banded", 2, **BANDED, **{"train.sequence_parallel": True}), None),
            (cfg("single-on-tp2", 2), resume_copy(tmp_path / "single", 2, tmp_path / "single-on-tp2")),
        ],
    )
    assert_matches_single(tmp_path / "single", tmp_path / "tp2")
    assert_matches_single(tmp_path / "banded", tmp_path / "tp2-sp-banded")
    # Muon orthogonalises whole matrices (DTensor gathers the shards); its bf16 Newton-Schulz steps round
    # differently on shards, hence the looser bound.
    for a, b in zip(rows(tmp_path / "muon"), rows(tmp_path / "tp2-muon"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a["step"], a["loss"], b["loss"])
    assert_same_losses(tmp_path / "single", tmp_path / "single-on-tp2", range(3, STEPS + 1))
    pretrain(cfg("tp2-on-one"), resume=resume_copy(tmp_path / "tp2", 2, tmp_path / "tp2-on-one"))
    assert_same_losses(tmp_path / "tp2", tmp_path / "tp2-on-one", range(3, STEPS + 1))


def test_tp2_dp2_matches_one_process_and_dcp_checkpoints_cross_layouts(tmp_path: Path, data):
    """4 processes, TP 2 x DP 2 (FSDP2 on a 2-D mesh) = one process with the same global batch; sharded
    checkpoints saved by one process resume under TP 2 x DP 2, and the reverse."""
    ds, tok = data

    def cfg(name: str, tp: int = 1):
        return dcp_config(ds, tok, tmp_path / name, **{"train.tensor_parallel": tp, "train.eval_interval": STEPS})

    launch(1, cfg("single"))
    run_jobs(
        4,
        [
            (cfg("tp2dp2", 2), None),
            (cfg("single-on-tp2dp2", 2), resume_copy(tmp_path / "single", 2, tmp_path / "single-on-tp2dp2")),
        ],
    )
    assert_matches_single(tmp_path / "single", tmp_path / "tp2dp2")
    assert_same_losses(tmp_path / "single", tmp_path / "single-on-tp2dp2", range(3, STEPS + 1))
    launch(1, cfg("tp2dp2-on-one"), resume=resume_copy(tmp_path / "tp2dp2", 2, tmp_path / "tp2dp2-on-one"))
    assert_same_losses(tmp_path / "tp2dp2", tmp_path / "tp2dp2-on-one", range(3, STEPS + 1))


def test_tensor_parallel_refusals(tmp_path: Path, data):
    from test_distributed import config

    from gptlab.config import apply_overrides
    from gptlab.train.pretrain import pretrain

    ds, tok = data
    base = config(ds, tok, tmp_path / "run")
    with pytest.raises(ValueError, match="needs at least 2 processes"):
        pretrain(apply_overrides(base, {"train.tensor_parallel": 2}))
    with pytest.raises(ValueError, match="set train.tensor_parallel > 1"):
        apply_overrides(base, {"train.sequence_parallel": True})
    with pytest.raises(ValueError, match="train.tensor_parallel must be >= 1"):
        apply_overrides(base, {"train.tensor_parallel": 0})


def test_check_model_names_what_does_not_divide():
    from gptlab.config import ModelConfig
    from gptlab.train.tensor_parallel import check_model

    check_model(ModelConfig(n_layer=1, n_head=4, n_embd=32), 4)
    with pytest.raises(ValueError, match="model.n_head = 3"):
        check_model(ModelConfig(n_layer=1, n_head=3, n_embd=24), 2)


def test_clip_grad_norm_equals_torchs_on_plain_tensors():
    from gptlab.train.distributed import clip_grad_norm

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    for max_norm in (1e9, 0.5):  # measure only, then clip
        expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        assert abs(clip_grad_norm(ours, max_norm) - float(expected)) < 1e-5
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.grad, b.grad)
