"""DPO and RL under DDP (2 CPU ranks, gloo) equal one process: the same global batch, split."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import save_model
from gptlab.config import ModelConfig
from gptlab.model import GPT

STEPS = 3
REWARD = "def share(c, e):\n    return sum(x.isascii() and x.islower() for x in c) / max(1, len(c))\n"


def setup(root: Path, tokenizer) -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=32, vocab_size=tokenizer.vocab_size))
    save_model(model, root / "base", tokenizer)
    words = "movie film book meal show song game trip".split()
    pairs = [{"prompt": f"the {w} was", "chosen": " good.", "rejected": " bad and long."} for w in words]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"w{i}:"}) + "\n" for i in range(16)))
    (root / "reward.py").write_text(REWARD)


def configs(root: Path, name: str) -> list:
    from gptlab.finetune.rl import RLConfig
    from gptlab.finetune.runner import FinetuneConfig

    common = dict(base=str(root / "base"), max_steps=STEPS, batch_size=4, lr=1e-2, warmup_steps=0, progress=False,
                  train_overrides={"train.tensorboard": "false", "train.log_interval": "1", "train.threads": "1"})
    rl = RLConfig(prompts=str(root / "prompts.jsonl"), reward=f"{root / 'reward.py'}:share", group_size=4,
                  max_new_tokens=4)
    return [
        FinetuneConfig(task="dpo", train_file=str(root / "pairs.jsonl"), out=str(root / name / "dpo"), **common),
        FinetuneConfig(task="rl", rl=rl, out=str(root / name / "rl"), **common),
    ]


def _worker(rank: int, world_size: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from gptlab.finetune.runner import finetune

    dist.init_process_group("gloo")
    try:
        for cfg in configs(Path(root), "ddp"):
            finetune(cfg)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dpo_and_rl_under_ddp_match_one_process(tmp_path: Path, byte_tokenizer):
    import torch.multiprocessing as mp

    from gptlab.checkpoint import read_safetensors
    from gptlab.finetune.runner import finetune

    setup(tmp_path, byte_tokenizer)
    for cfg in configs(tmp_path, "single"):
        finetune(cfg)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    def column(name: str, task: str, key: str) -> list[float]:
        text = (tmp_path / name / task / "train/metrics.jsonl").read_text()
        return [json.loads(x)[key] for x in text.splitlines()]

    for task, key in (("dpo", "loss"), ("rl", "reward"), ("rl", "loss")):
        single, ddp = column("single", task, key), column("ddp", task, key)
        assert len(single) == len(ddp) == STEPS
        # RL rollouts are seeded by prompt index, so both runs sample the same completions.
        assert ddp == pytest.approx(single, abs=1e-5), (task, key, single, ddp)
    for task in ("dpo", "rl"):
        a = read_safetensors(tmp_path / "single" / task / "model.safetensors")
        b = read_safetensors(tmp_path / "ddp" / task / "model.safetensors")
        for k in a:
            # Adam turns float32 reduction-order noise in near-zero gradients into up to ~3e-5 here: a few
            # thousandths of one update (lr 1e-2), far below any real divergence.
            assert (a[k] - b[k]).abs().max() < 1e-4, (task, k)
