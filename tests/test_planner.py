"""`gptlab plan`: training time against Narayanan et al. 2021, predicted memory against a CPU run's
allocated tensors, and a config `gptlab train` reads."""

from __future__ import annotations

from pathlib import Path

import torch


def test_gpt3_175b_days_match_narayanan_2021():
    """175B on 300B tokens, 1,024 A100s at 140 TFLOP/s each, 8 N D FLOPs: about 34 days (their eq. 4)."""
    from gptlab.presets import preset
    from gptlab.reports.planner import plan

    n, tokens = 175e9, 300e9
    published = 8 * n * tokens / (1024 * 140e12) / 86400
    assert abs(published - 34) < 0.5
    p = plan(preset("gpt3-175b"), "A100", 1024, 2048, 2048, tokens, mfu=140e12 / 312e12, activation_checkpointing=True)
    assert abs(p.days - 34) / 34 < 0.15, p.days
    assert p.memory["total"] <= 0.9 * 80e9


def test_predicted_state_memory_matches_a_cpu_run():
    """Weights, gradients and AdamW state of an fp32 run: what `training_memory` predicts (15%)."""
    from gptlab.config import ModelConfig
    from gptlab.model import GPT
    from gptlab.reports.sizing import training_memory
    from gptlab.train.config import OptimSection
    from gptlab.train.optim import build_optimizer

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, n_ctx=32, vocab_size=300)
    model = GPT(cfg)
    opt = build_optimizer(model, model.named_parameters(), OptimSection(), torch.device("cpu"))
    x = torch.randint(0, 300, (2, 32))
    model(x, x)[1].backward()
    opt.step()
    measured = {
        "weights": sum(p.nbytes for p in model.parameters()),
        "gradients": sum(p.grad.nbytes for p in model.parameters()),
        "optimizer": sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
    }
    predicted = training_memory(cfg, 2, 32)
    for part, value in measured.items():
        assert abs(predicted[part] - value) / value < 0.15, (part, predicted[part], value)


def test_plan_writes_a_train_config(tmp_path: Path, capsys):
    from gptlab.cli import main
    from gptlab.train.config import load_train_config

    out = tmp_path / "plan.json"
    assert main(["plan", "gpt2", "--gpu", "H100", "--gpus", "64", "--seq-len", "1024", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "memory per GPU: weights" in text and "days at 40% MFU" in text
    cfg = load_train_config(out)
    assert (cfg.train.batch_size, cfg.train.strategy, cfg.train.checkpoint_format) == (1536, "fsdp", "dcp")
    assert cfg.train.batch_size % (64 * cfg.train.micro_batch_size) == 0
    assert main(["plan", "gpt3-175b", "--gpu", "H100", "--gpus", "8", "--global-batch", "8", "--out", str(out)]) != 0
    assert "does not fit 8 x H100" in capsys.readouterr().err


def test_tensor_parallel_when_data_parallel_alone_does_not_fit(tmp_path: Path):
    """175B on 64 H100s: FSDP alone needs activation checkpointing; tensor parallel 8 (within a node) fits
    without it, each GPU holding 1/8 of the blocks' state over 8 data-parallel ranks."""
    from gptlab.presets import preset
    from gptlab.reports.planner import USABLE_MEMORY, plan, write_plan_config
    from gptlab.reports.sizing import training_memory
    from gptlab.train.config import load_train_config

    cfg = preset("gpt3-175b")
    p = plan(cfg, "H100", 64, 2048, 1536)
    assert (p.tensor_parallel, p.data_parallel, p.activation_checkpointing) == (8, 8, False)
    blocks, n = cfg.n_params(embeddings=False), cfg.n_params()
    whole = training_memory(cfg, p.micro_batch, 2048)
    expected = whole["weights"] * (blocks / 8 + n - blocks) / n / 8
    assert abs(p.memory["weights"] - expected) / expected < 1e-9
    assert p.memory["total"] <= USABLE_MEMORY * 80e9
    # With the data-parallel layout only (tensor parallel 1), the activations alone overflow the GPU.
    assert training_memory(cfg, 1, 2048)["activations"] > 80e9
    loaded = load_train_config(write_plan_config(p, "gpt3-175b", tmp_path / "p.json"))
    assert (loaded.train.tensor_parallel, loaded.train.sequence_parallel) == (8, True)
