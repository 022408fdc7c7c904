"""optim.name = "muon": torch.optim.Muon for the blocks' matrices, AdamW for the rest; training and an
exact resume through the single-file checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from test_distributed import config, make_dataset, rows
from test_sharded_checkpoint import assert_same_losses, resume_copy


def test_parameter_split():
    from gptlab.config import ModelConfig
    from gptlab.model import GPT
    from gptlab.train.config import OptimSection
    from gptlab.train.optim import build_optimizer

    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=32, vocab_size=300))
    opt = build_optimizer(model, model.named_parameters(), OptimSection(name="muon"), torch.device("cpu"))
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    expected = {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert in_muon == expected and len(expected) == 8  # c_attn, attn c_proj, c_fc, mlp c_proj per block
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_adamw == set(names.values()) - expected  # embeddings, norms, biases
    assert muon.param_groups[0]["lr"] == OptimSection().muon_lr


def test_muon_trains_and_resumes_exactly(tmp_path: Path):
    from gptlab.config import apply_overrides
    from gptlab.train.pretrain import pretrain

    ds, tok = make_dataset(tmp_path)

    def cfg(run: Path):
        return apply_overrides(
            config(ds, tok, run),
            {"optim.name": "muon", "train.checkpoint_interval": 2, "train.keep_checkpoints": 0},
        )

    run = tmp_path / "run"
    pretrain(cfg(run))
    losses = [r["loss"] for r in rows(run)]
    assert losses[-1] < losses[0]
    again = tmp_path / "again"
    pretrain(cfg(again), resume=resume_copy(run, 2, again))
    assert_same_losses(run, again, range(3, 5))
    shutil.rmtree(again)
