"""Sharded (DCP) checkpoints: exact resume, a crash mid-save, resharding across world sizes (gloo on
CPU), and `gptlab convert` to and from the single-file checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_distributed import _free_port, config, make_dataset, rows

STEPS = 4


def dcp_config(ds: Path, tok: Path, run_dir: Path, strategy: str = "fsdp", **extra):
    from gptlab.config import apply_overrides

    cfg = config(ds, tok, run_dir, strategy)
    settings = {
        "train.checkpoint_format": "dcp",
        "train.checkpoint_interval": 2,
        "train.keep_checkpoints": 0,
        "train.eval_interval": 0,
        **extra,
    }
    return apply_overrides(cfg, settings)


def _worker(rank: int, world: int, port: int, cfg_json: str, resume: str | None) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    from gptlab.train.config import TrainConfig
    from gptlab.train.pretrain import pretrain

    pretrain(TrainConfig.from_dict(json.loads(cfg_json)), resume=Path(resume) if resume else False)


def launch(world: int, cfg, resume: Path | None = None) -> None:
    """`pretrain(cfg)` on `world` processes (gloo), or in this process when world is 1."""
    import torch.multiprocessing as mp

    from gptlab.train.pretrain import pretrain

    if world == 1:
        pretrain(cfg, resume=resume or False)
        return
    args = (world, _free_port(), json.dumps(cfg.to_dict()), str(resume) if resume else None)
    mp.spawn(_worker, args=args, nprocs=world, join=True)


def resume_copy(run: Path, step: int, new: Path) -> Path:
    """A copy of `run` holding its checkpoints up to `step`: the place a resumed run continues in."""
    shutil.copytree(run, new)
    for ckpt in (new / "checkpoints").iterdir():
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    lines = [ln for ln in (new / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= step]
    (new / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return new / "checkpoints" / f"step_{step:08d}"


def assert_same_losses(a: Path, b: Path, steps: range) -> None:
    ra = {r["step"]: r["loss"] for r in rows(a)}
    rb = {r["step"]: r["loss"] for r in rows(b)}
    for s in steps:
        assert abs(ra[s] - rb[s]) <= 1e-5, (s, ra[s], rb[s])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def test_exact_resume_and_convert_round_trip(tmp_path: Path, data):
    from gptlab.checkpoint import load_model
    from gptlab.train.sharded import sharded_to_single, single_to_sharded

    ds, tok = data
    run = tmp_path / "run"
    launch(1, dcp_config(ds, tok, run, "ddp"))
    ckpt = run / "checkpoints" / "step_00000002"
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()

    again = tmp_path / "again"
    launch(1, dcp_config(ds, tok, again, "ddp"), resume=resume_copy(run, 2, again))
    assert_same_losses(run, again, range(3, STEPS + 1))  # exact resume: same world size, same losses

    # DCP -> one file (loadable by generate / serve) -> DCP; the round trip resumes to the same losses.
    from gptlab.cli import main

    assert main(["convert", "--from-dcp", str(ckpt), "--out", str(tmp_path / "single")]) == 0
    single = tmp_path / "single"
    with pytest.raises(ValueError, match="--overwrite"):
        sharded_to_single(ckpt, single)
    final = load_model(sharded_to_single(run / "checkpoints" / "step_00000004", tmp_path / "final"))
    direct = load_model(run / "checkpoints" / "step_00000004").state_dict()  # generate / serve read DCP too
    for name, value in final.state_dict().items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(direct[name], value), name
    back = tmp_path / "back"
    (back / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.json", back / "config.json")
    shutil.copytree(run / "tokenizer", back / "tokenizer")
    single_to_sharded(single, back / "checkpoints" / "step_00000002")
    launch(1, dcp_config(ds, tok, back, "ddp"), resume=back / "checkpoints" / "step_00000002")
    assert_same_losses(run, back, range(3, STEPS + 1))
    with pytest.raises(ValueError, match="sharded"):
        single_to_sharded(ckpt, tmp_path / "nope")


def _crash_worker(cfg_json: str) -> None:
    """Trains, and dies (no cleanup, as a kill would) while writing the step-4 checkpoint's shards."""
    from torch.distributed.checkpoint import FileSystemWriter

    from gptlab.train.config import TrainConfig
    from gptlab.train.pretrain import pretrain

    plain = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if "step_00000004" in str(self.path):
            os._exit(3)
        return plain(self, plan, planner)

    FileSystemWriter.write_data = write_data
    pretrain(TrainConfig.from_dict(json.loads(cfg_json)))


def test_killed_mid_save_keeps_the_previous_checkpoint(tmp_path: Path, data):
    import multiprocessing

    from gptlab.checkpoint import list_checkpoints

    ds, tok = data
    run = tmp_path / "run"
    cfg = dcp_config(ds, tok, run, "ddp")
    child = multiprocessing.get_context("spawn").Process(target=_crash_worker, args=(json.dumps(cfg.to_dict()),))
    child.start()
    child.join()
    assert child.exitcode == 3
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert (run / "checkpoints" / ".tmp-step_00000004").is_dir()  # the half-written one, never loaded

    launch(1, cfg, resume=run)
    assert not (run / "checkpoints" / ".tmp-step_00000004").exists()
    reference = tmp_path / "reference"
    launch(1, dcp_config(ds, tok, reference, "ddp"))
    assert_same_losses(reference, run, range(3, STEPS + 1))


def test_fsdp_async_save_on_two_resumes_on_one(tmp_path: Path, data):
    """Saved asynchronously by 2 FSDP processes, resumed by 1: the same losses as the 2-process run."""
    ds, tok = data
    run = tmp_path / "two"
    launch(2, dcp_config(ds, tok, run, **{"train.async_checkpoint": True}))
    one = tmp_path / "one"
    launch(1, dcp_config(ds, tok, one), resume=resume_copy(run, 2, one))
    assert_same_losses(run, one, range(3, STEPS + 1))


@pytest.mark.slow
def test_resume_across_world_sizes_4_2_1_and_back(tmp_path: Path, data):
    ds, tok = data
    for source, worlds in ((4, (2, 1)), (1, (2, 4))):
        saved = tmp_path / f"saved{source}"
        launch(source, dcp_config(ds, tok, saved))
        for world in worlds:
            run = tmp_path / f"from{source}-on{world}"
            launch(world, dcp_config(ds, tok, run), resume=resume_copy(saved, 2, run))
            assert_same_losses(saved, run, range(3, STEPS + 1))
