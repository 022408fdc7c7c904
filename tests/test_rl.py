"""RL fine-tuning: rewards, advantages and the GRPO / REINFORCE objectives against their formulas,
rollout log-probs from the inference engine against the trainer's recomputation, a few steps that
raise a trivially learnable reward, and exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab.checkpoint import read_safetensors, save_model
from gptlab.config import ModelConfig
from gptlab.finetune.rewards import load_reward, score
from gptlab.finetune.rl import RLConfig, RLTask, advantages, build_rl_task, policy_loss
from gptlab.finetune.runner import FinetuneConfig, finetune
from gptlab.model import GPT
from gptlab.train.losses import apply_token_log_probs, token_log_probs

QUIET = {"train.tensorboard": "false"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only contend


def tiny_gpt(seed: int = 0, n_ctx: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=n_ctx, vocab_size=258))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


A_REWARD = '''
def share_of_a(completion, example):
    """Trivially learnable: the share of ASCII lowercase letters in the completion (26 of a random
    byte-level model's 258 tokens), the letter a counting double."""
    return sum((c.isascii() and c.islower()) + (c == "a") for c in completion) / max(1, len(completion))
'''


# ---- rewards ---------------------------------------------------------------------------------------
def test_builtin_and_user_rewards(tmp_path, monkeypatch):
    exact, field = load_reward("exact_match")
    assert field == "answer" and exact(" 42 ", {"answer": 42}) == 1.0 and exact("42.", {"answer": "42"}) == 0.0
    numeric, _ = load_reward("numeric")
    assert numeric("it is 42.0!", {"answer": "42"}) == 1.0 and numeric("41 or 42", {"answer": 42}) == 0.0
    assert numeric("no digits", {"answer": 1}) == 0.0
    pattern, _ = load_reward(r"regex:^\s*\d+$")
    assert pattern(" 123", {}) == 1.0 and pattern(" 12a", {}) == 0.0
    per_example, field = load_reward("regex")
    assert field == "pattern" and per_example("abc", {"pattern": "b"}) == 1.0
    (tmp_path / "my_rewards.py").write_text(A_REWARD)
    by_path, _ = load_reward(f"{tmp_path / 'my_rewards.py'}:share_of_a")
    assert by_path("aaB", {}) == pytest.approx(4 / 3)
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module, _ = load_reward("my_rewards:share_of_a")
    assert by_module("b", {}) == 1.0
    for bad, message in [("nonsense", "unknown reward"), ("regex:(", "not a valid regular expression"),
                         ("my_rewards:missing", "no callable"), ("nowhere/x.py:f", "does not exist")]:
        with pytest.raises(ValueError, match=message):
            load_reward(bad)
    with pytest.raises(ValueError, match="must return a finite number"):
        score(lambda c, e: float("nan"), ["x"], [{"prompt": "p"}])


def test_advantages_by_formula():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    grpo = advantages(r, 4, "grpo")
    group = r[:4]
    torch.testing.assert_close(grpo[:4], (group - group.mean()) / (group.std() + 1e-4))
    assert grpo[4:].abs().max() == 0  # equal rewards: no signal
    loo = advantages(r, 4, "reinforce")
    assert loo[0].item() == pytest.approx(1.0 - (0 + 0 + 1) / 3)
    single = advantages(torch.tensor([1.0, 0.0, 2.0]), 1, "reinforce")
    torch.testing.assert_close(single, torch.tensor([1.0 - 1.0, 0.0 - 1.5, 2.0 - 0.5]))


def test_grpo_and_reinforce_objectives_by_formula():
    torch.manual_seed(0)
    logps = (torch.randn(3, 5) - 2).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(3, 5)
    ref = logps.detach() + 0.2 * torch.randn(3, 5)
    targets = torch.tensor([[-1, 4, 5, 6, 7], [-1, -1, 4, 5, -1], [-1, 3, -1, -1, -1]])
    adv = torch.tensor([1.0, -0.5, 2.0])
    cfg = RLConfig(prompts="p.jsonl", kl_coef=0.1, clip=0.2)
    got = policy_loss(logps, targets, adv, cfg, ref, old)
    total = 0.0
    for i in range(3):
        terms = []
        for t in range(5):
            if targets[i, t] == -1:
                continue
            rho = math.exp(logps[i, t].item() - old[i, t].item())
            clipped = min(max(rho, 0.8), 1.2)
            q = ref[i, t].item() - logps[i, t].item()
            terms.append(-min(rho * adv[i].item(), clipped * adv[i].item()) + 0.1 * (math.exp(q) - q - 1))
        total += sum(terms) / len(terms)
    assert got.item() == pytest.approx(total / 3, rel=1e-5)
    # On-policy (old = current) the gradient is the policy gradient: -A / |y| per completion token.
    cfg0 = RLConfig(prompts="p.jsonl", kl_coef=0.0)
    policy_loss(logps, targets, adv, cfg0).backward()
    mask = (targets != -1).float()
    torch.testing.assert_close(logps.grad, -(adv[:, None] * mask / mask.sum(1, keepdim=True)) / 3)
    logps.grad = None
    reinforce = RLConfig(prompts="p.jsonl", algorithm="reinforce", kl_coef=0.0, group_size=1)
    value = policy_loss(logps, targets, adv, reinforce)
    assert value.item() == pytest.approx((-(adv * (logps * mask).sum(1))).mean().item(), rel=1e-6)


# ---- rollouts ---------------------------------------------------------------------------------------
def make_task(byte_tokenizer, tmp_path, model: GPT, **cfg) -> RLTask:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}:"} for w in ("ab", "cd", "ef", "gh")])
    (tmp_path / "r.py").write_text(A_REWARD)
    config = RLConfig(prompts=str(prompts), reward=f"{tmp_path / 'r.py'}:share_of_a", **cfg)
    return build_rl_task(config, model, byte_tokenizer, None, pad_id=byte_tokenizer.eot_id, seed=0)


def test_rollout_log_probs_match_the_trainers_recomputation(byte_tokenizer, tmp_path):
    from gptlab.infer.cpu import kernels

    model = tiny_gpt()
    with torch.no_grad():  # a peaked distribution: samples end at <|endoftext|> sometimes, not always
        model.transformer.wte.weight[byte_tokenizer.eot_id] *= 3
    task = make_task(byte_tokenizer, tmp_path, model, group_size=4, max_new_tokens=8)
    task.prepare_model(model)
    for round in range(2):
        batch = task.batch(range(4 * round, 4 * round + 4))
        assert batch["idx"].shape[0] == 16
        with torch.no_grad():
            recomputed = token_log_probs(model, batch["idx"], batch["targets"])
        sampled = ~torch.isnan(batch["rollout_logps"])
        assert sampled.sum() > 16
        torch.testing.assert_close(batch["rollout_logps"][sampled], recomputed[sampled], atol=2e-5, rtol=1e-5)
        if kernels.available():  # rollouts ran on gptlab's C decoding step
            assert task.sampler().quantized == "float32-kernels"
        with torch.no_grad():  # an optimizer step: the next rollout must sample the new weights
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    # Seeded by the prompts' global indices: the same indices give the same rollout.
    again = task.batch(range(4, 8))
    assert torch.equal(again["idx"], task.batch(range(4, 8))["idx"])


def test_chunked_policy_gradient_equals_full_logits(byte_tokenizer, tmp_path):
    model = tiny_gpt()
    task = make_task(byte_tokenizer, tmp_path, model, group_size=4, max_new_tokens=6)
    task.prepare_model(model)
    batch = task.batch(range(4))
    apply_token_log_probs(model, block=7)  # small blocks: many chunks per batch
    task.loss(model, batch).backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, _ = GPT.forward(model, batch["idx"])  # the full (N, T, V) reference
    logps = F.log_softmax(logits.float(), -1).gather(-1, batch["targets"].clamp(min=0)[..., None]).squeeze(-1)
    logps = logps * (batch["targets"] != -1)
    policy_loss(logps, batch["targets"], batch["advantages"], task.cfg, batch.get("ref_logps")).backward()
    for a, p in zip(chunked, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


# ---- end to end ------------------------------------------------------------------------------------
@pytest.fixture()
def rl_files(tmp_path, byte_tokenizer):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"word {i}:"} for i in range(40)])
    (tmp_path / "r.py").write_text(A_REWARD)
    base = save_model(tiny_gpt(), tmp_path / "base", byte_tokenizer)
    return prompts, f"{tmp_path / 'r.py'}:share_of_a", base


@pytest.mark.parametrize("algorithm", ["grpo", "reinforce"])
def test_a_few_rl_steps_raise_the_reward(rl_files, tmp_path, algorithm):
    prompts, reward, base = rl_files
    rl = RLConfig(prompts=str(prompts), reward=reward, algorithm=algorithm, group_size=8, max_new_tokens=4)
    r = finetune(FinetuneConfig(task="rl", base=str(base), rl=rl, out=str(tmp_path / "out"), max_steps=30,
                                batch_size=4, lr=1e-2, warmup_steps=0, progress=False,
                                train_overrides={**QUIET, "train.log_interval": "1"}))
    rows = [json.loads(x) for x in (r.out / "train/metrics.jsonl").read_text().splitlines()]
    rewards = [row["reward"] for row in rows if "reward" in row]
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3 and last > first + 0.3, rewards


@pytest.mark.parametrize("lora", [False, True])
def test_rl_resumes_exactly(rl_files, tmp_path, lora):
    from gptlab.finetune.lora import LoRAConfig

    prompts, reward, base = rl_files
    rl = RLConfig(prompts=str(prompts), reward=reward, group_size=4, max_new_tokens=4, kl_coef=0.1)
    common = dict(task="rl", base=str(base), rl=rl, batch_size=4, lr=1e-2, warmup_steps=0, progress=False,
                  lora=LoRAConfig(rank=4) if lora else None,
                  train_overrides={**QUIET, "optim.decay_steps": "6", "train.checkpoint_interval": "3",
                                   "train.log_interval": "1"})
    whole = finetune(FinetuneConfig(out=str(tmp_path / "whole"), max_steps=6, **common))
    finetune(FinetuneConfig(out=str(tmp_path / "split"), max_steps=3, **common))
    resumed = finetune(FinetuneConfig(out=str(tmp_path / "split"), max_steps=6, resume=True, **common))
    name = "adapter.safetensors" if lora else "model.safetensors"
    a, b = read_safetensors(whole.out / name), read_safetensors(resumed.out / name)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)

    def column(out: Path, key: str) -> list[float]:
        rows = [json.loads(x) for x in (out / "train/metrics.jsonl").read_text().splitlines()]
        return [row[key] for row in rows if row.get(key) is not None]

    assert column(whole.out, "loss") == pytest.approx(column(resumed.out, "loss"), abs=1e-6)
    assert column(whole.out, "reward") == pytest.approx(column(resumed.out, "reward"), abs=1e-9)


def test_rl_cli_errors(tmp_path, capsys, rl_files):
    from gptlab.cli import main

    prompts, _, base = rl_files
    assert main(["finetune", "--task", "rl", "--base", str(base), "--out", str(tmp_path / "o")]) != 0
    assert "--prompts" in capsys.readouterr().err
    assert main(["finetune", "--task", "rl", "--base", str(base), "--out", str(tmp_path / "o"),
                 "--prompts", str(prompts), "--reward", "exact_match"]) != 0
    assert "missing field(s) ['answer']" in capsys.readouterr().err


@pytest.mark.slow
def test_rl_raises_held_out_arithmetic_exact_match_by_20_points(tmp_path):
    """The README's recipe: SFT a tiny model to the answer format, then GRPO within 15 minutes on 2 cores."""
    import runpy

    recipe = Path(__file__).resolve().parents[1] / "examples/posttrain/arithmetic_rl.py"
    main = runpy.run_path(str(recipe))["main"]
    assert main(["--out", str(tmp_path / "arith")]) == 0
    summary = json.loads((tmp_path / "arith/summary.json").read_text())
    assert summary["exact_match_after_rl"] - summary["exact_match_after_sft"] >= 0.20, summary
    assert summary["rl_minutes"] <= 15, summary
