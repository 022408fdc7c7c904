"""DPO: the loss against the paper's formula and TRL's DPOTrainer, chunked token log-probabilities
against the unchunked reference, a synthetic preference task, and exact resume."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab.checkpoint import read_safetensors, save_model
from gptlab.config import ModelConfig
from gptlab.finetune.dpo import DPOTask, dpo_loss, encode_preferences, load_preferences
from gptlab.finetune.runner import FinetuneConfig, finetune
from gptlab.model import GPT
from gptlab.train.losses import apply_token_log_probs, linear_log_probs, token_log_probs

QUIET = {"train.tensorboard": "false"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only contend


def tiny_gpt(vocab_size: int = 258, n_embd: int = 32, n_ctx: int = 48, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=n_embd, n_ctx=n_ctx, vocab_size=vocab_size))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


POSITIVE = "good great fine nice superb lovely".split()
NEGATIVE = "bad awful poor nasty dull grim".split()
NOUNS = "movie film book meal show song game trip play tale cake view".split()


def preference(noun: str, rng: random.Random) -> dict:
    """Prefer the review with a positive word: a rule the completions' first word decides."""
    return {
        "prompt": f"the {noun} was",
        "chosen": f" {rng.choice(POSITIVE)}.",
        "rejected": f" {rng.choice(NEGATIVE)}.",
    }


# ---- the loss -------------------------------------------------------------------------------------
def test_dpo_loss_equals_the_papers_formula():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6) * 3 for _ in range(4))
    beta = 0.3
    losses, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(6):  # eq. 7: -log sigma(beta log(pi_c / ref_c) - beta log(pi_r / ref_r))
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        assert losses[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-5)
        assert chosen_reward[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item(), rel=1e-5)
    nc, nr = torch.tensor([3, 1, 4, 1, 5, 9]), torch.tensor([2, 6, 5, 3, 5, 8])
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo", nc, nr)
    for i in range(6):  # IPO eq. 17 on per-token mean log-ratios
        h = (pc[i] - rc[i]).item() / nc[i].item() - (pr[i] - rr[i]).item() / nr[i].item()
        assert ipo[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-5)
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(pc, pr, rc, rr, beta, "hinge")


def sequence_logp(model: GPT, ids: list[int], start: int) -> float:
    """log pi(ids[start:] | ids[:start]) from full logits: the unchunked reference."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
        logp = F.log_softmax(logits[0].double(), -1)
        return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_task_loss_on_a_batch_equals_direct_computation(byte_tokenizer, loss_type, tmp_path):
    rng = random.Random(0)
    examples = load_preferences(write_jsonl(tmp_path / "p.jsonl", [preference(n, rng) for n in NOUNS[:5]]))
    pairs = encode_preferences(examples, byte_tokenizer, 48)
    reference = tiny_gpt(seed=0)
    policy = tiny_gpt(seed=1)
    task = DPOTask(pairs, None, pad_id=byte_tokenizer.eot_id, beta=0.2, loss_type=loss_type)
    task.set_reference(reference)
    batch = task.batch(range(5))
    trained = copy.deepcopy(policy)
    apply_token_log_probs(trained)
    loss = task.loss(trained, batch)
    expected = []
    order = [task._example(i) for i in range(5)]  # the batch's pairs, in its order
    for p in order:
        prompt = len(p[0]) - sum(t != -1 for t in p[1]) + 1
        seq_c, seq_r = p[0] + [p[1][-1]], p[2] + [p[3][-1]]
        prompt_r = len(p[2]) - sum(t != -1 for t in p[3]) + 1
        pc, rc = sequence_logp(policy, seq_c, prompt), sequence_logp(reference, seq_c, prompt)
        pr, rr = sequence_logp(policy, seq_r, prompt_r), sequence_logp(reference, seq_r, prompt_r)
        h = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            expected.append(-math.log(1 / (1 + math.exp(-0.2 * h))))
        else:
            nc, nr = len(seq_c) - prompt, len(seq_r) - prompt_r
            expected.append(((pc - rc) / nc - (pr - rr) / nr - 1 / 0.4) ** 2)
    assert loss.item() == pytest.approx(sum(expected) / 5, rel=1e-4)


def test_dpo_loss_equals_trl_dpo_trainer(byte_tokenizer, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'gptlab[trl]')")
    transformers = pytest.importorskip("transformers")
    from datasets import Dataset

    from gptlab.interop.hf import save_hf

    policy, reference = tiny_gpt(seed=1), tiny_gpt(seed=0)
    save_hf(policy, tmp_path / "policy", byte_tokenizer)
    save_hf(reference, tmp_path / "reference", byte_tokenizer)
    rng = random.Random(1)
    records = [preference(n, rng) for n in NOUNS[:4]]
    records[1]["chosen"] = " a much longer chosen answer."  # unequal lengths: padding inside the batch
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "policy")
    hf_tokenizer.pad_token = hf_tokenizer.eos_token
    for loss_type, beta in (("sigmoid", 0.1), ("ipo", 0.5)):
        args = trl.DPOConfig(
            output_dir=str(tmp_path / "trl"),
            beta=beta,
            loss_type=[loss_type],
            per_device_train_batch_size=4,
            report_to="none",
            use_cpu=True,
            max_length=None,
            seed=0,
        )
        hf_policy = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "policy", attn_implementation="eager")
        hf_reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "reference", attn_implementation="eager")
        trainer = trl.DPOTrainer(
            model=hf_policy,
            ref_model=hf_reference,
            args=args,
            train_dataset=Dataset.from_list(records),
            processing_class=hf_tokenizer,
        )
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.eval()
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, batch).item()
        # The same token ids through gptlab: targets are the completion tokens, -1 elsewhere.
        ids, mask = batch["input_ids"], batch["completion_mask"]
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
        with torch.no_grad():
            logp = token_log_probs(policy.eval(), ids[:, :-1], targets).sum(1)
            ref = token_log_probs(reference.eval(), ids[:, :-1], targets).sum(1)
        counts = (targets != -1).sum(1).float()
        n = ids.shape[0] // 2
        ours, _, _ = dpo_loss(logp[:n], logp[n:], ref[:n], ref[n:], beta, loss_type, counts[:n], counts[n:])
        # TRL's reference pass (its fused head under accelerate's autocast context) strays from a float64
        # computation by up to ~1e-3 nats per sequence, gptlab's by ~3e-6: hence 1e-3, not float32's 1e-6.
        assert ours.mean().item() == pytest.approx(trl_loss, rel=1e-3), loss_type
        assert abs(ours.mean().item() - trl_loss) < 0.05 * abs(trl_loss - dpo_loss(
            logp[:n], logp[n:], logp[:n], logp[n:], beta, loss_type, counts[:n], counts[n:])[0].mean().item())


# ---- chunked log-probabilities ---------------------------------------------------------------------
def test_linear_log_probs_equal_unchunked_values_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (3, 11))
    targets[0, :4] = -1
    upstream = torch.randn(3, 11)
    full = F.log_softmax(F.linear(hidden, weight), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    full = full * (targets != -1)
    (full * upstream).sum().backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked = linear_log_probs(hidden, weight, targets, block=5)
    (chunked * upstream).sum().backward()
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, want_h, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad, want_w, atol=1e-5, rtol=1e-4)
    # Nothing of (tokens x vocabulary) is kept for the backward pass: hidden, weight, targets and one
    # float per token; the logits exist one block (5 x 97) at a time.
    assert sorted(math.prod(s) for s in saved)[-1] == 97 * 16 < 33 * 97  # the weight is the largest
    assert [s for s in saved if math.prod(s) == 33] == [torch.Size([33])] * 2  # targets, log-sum-exp


# ---- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preference_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    rng = random.Random(0)
    train = [preference(n, rng) for n in NOUNS[:8] for _ in range(20)]
    # Held out: nouns never seen in training.
    val = [preference(n, rng) for n in NOUNS[8:] for _ in range(25)]
    return write_jsonl(root / "train.jsonl", train), write_jsonl(root / "val.jsonl", val)


def test_dpo_raises_held_out_preference_accuracy_above_90_percent(byte_tokenizer, preference_files, tmp_path):
    train, val = preference_files
    base = save_model(tiny_gpt(), tmp_path / "base", byte_tokenizer)
    common = dict(task="dpo", base=str(base), train_file=str(train), val_file=str(val), batch_size=16,
                  lr=3e-3, progress=False, train_overrides=QUIET)
    untrained = finetune(FinetuneConfig(out=str(tmp_path / "zero"), max_steps=1, lr=1e-9, **{
        k: v for k, v in common.items() if k != "lr"}))
    assert untrained.metrics["val_accuracy"] < 0.8  # the base has no preference to start with
    r = finetune(FinetuneConfig(out=str(tmp_path / "out"), max_steps=40, eval_interval=20, **common))
    assert r.metrics["val_accuracy"] > 0.9, r.metrics
    assert r.metrics["val_margin"] > 0
    first = json.loads((untrained.out / "train/metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 1: the policy is the reference


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_resumes_exactly(byte_tokenizer, preference_files, tmp_path, lora):
    from gptlab.finetune.lora import LoRAConfig

    train, _ = preference_files
    base = save_model(tiny_gpt(), tmp_path / "base", byte_tokenizer)
    common = dict(task="dpo", base=str(base), train_file=str(train), batch_size=8, lr=1e-3, warmup_steps=0,
                  lora=LoRAConfig(rank=4) if lora else None, progress=False,
                  train_overrides={**QUIET, "optim.decay_steps": "6", "train.checkpoint_interval": "3"})
    whole = finetune(FinetuneConfig(out=str(tmp_path / "whole"), max_steps=6, **common))
    finetune(FinetuneConfig(out=str(tmp_path / "split"), max_steps=3, **common))
    resumed = finetune(FinetuneConfig(out=str(tmp_path / "split"), max_steps=6, resume=True, **common))
    name = "adapter.safetensors" if lora else "model.safetensors"
    a, b = read_safetensors(whole.out / name), read_safetensors(resumed.out / name)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)

    def losses(out: Path) -> list[float]:
        rows = [json.loads(x) for x in (out / "train/metrics.jsonl").read_text().splitlines()]
        return [row["loss"] for row in rows if row.get("loss") is not None]

    assert losses(whole.out)[-1] == pytest.approx(losses(resumed.out)[-1], abs=1e-6)
