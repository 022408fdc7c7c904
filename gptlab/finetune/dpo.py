"""Direct preference optimisation (Rafailov et al. 2023, arXiv:2305.18290) as a Task of the one loop.

Data: {"prompt", "chosen", "rejected"} lines. Each completion is scored as SFT scores it (prompt, then
completion + <|endoftext|>); a pair's reward is beta times its log-ratio to the reference model,
    r = beta * (log pi(y | x) - log pi_ref(y | x)),
and the loss is
    sigmoid (DPO, eq. 7):  -log sigmoid(r_chosen - r_rejected)
    ipo (Azar et al. 2023, arXiv:2310.12036, eq. 17):  (h - 1 / (2 beta))^2 with h the difference of
        the per-token mean log-ratios (the normalisation TRL uses, confirmed there with IPO's authors).
The reference is the base model before training: its log-probabilities are computed once, before any
update (and before LoRA adapters exist), and stored with the examples, so no second model is held.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.finetune.data import (
    IGNORE_INDEX,
    SFTExample,
    TokenizerLike,
    encode_sft,
    pad_right,
    read_jsonl,
    target_tokens,
)
from gptlab.finetune.tasks import ExamplesTask

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str
    where: str


def load_preferences(path: str | os.PathLike[str]) -> list[PreferenceExample]:
    """Read {"prompt", "chosen", "rejected"} records (the prompt may be empty, the completions not)."""
    out = []
    for number, record in read_jsonl(path, ("prompt", "chosen", "rejected")):
        where = f"{path}:{number}"
        for name in ("prompt", "chosen", "rejected"):
            value = record[name]
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r}")
            if name != "prompt" and not value:
                raise ValueError(f"{where}: field {name!r} is empty")
        if record["chosen"] == record["rejected"]:
            raise ValueError(f"{where}: 'chosen' and 'rejected' are the same text; a pair needs two different ones")
        out.append(PreferenceExample(record["prompt"], record["chosen"], record["rejected"], where))
    return out


Pair = tuple[list[int], list[int], list[int], list[int]]
"""(chosen inputs, chosen targets, rejected inputs, rejected targets), as `encode_sft` makes them."""


def encode_preferences(examples: Sequence[PreferenceExample], tokenizer: TokenizerLike, n_ctx: int) -> list[Pair]:
    chosen = encode_sft([SFTExample(e.prompt, e.chosen, e.where) for e in examples], tokenizer, n_ctx)
    rejected = encode_sft([SFTExample(e.prompt, e.rejected, e.where) for e in examples], tokenizer, n_ctx)
    return [(xc, yc, xr, yr) for (xc, yc), (xr, yr) in zip(chosen, rejected, strict=True)]


def pair_batch(pairs: Sequence[Pair], pad_id: int) -> dict[str, Tensor]:
    """{'idx', 'targets'}: (2B, T), chosen rows first, then rejected rows in the same order."""
    return {
        "idx": pad_right([p[0] for p in pairs] + [p[2] for p in pairs], pad_id),
        "targets": pad_right([p[1] for p in pairs] + [p[3] for p in pairs], IGNORE_INDEX),
    }


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), each (B,), from summed completion log-probs.
    IPO also needs each completion's token count (`chosen_tokens`, `rejected_tokens`)."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs the completions' token counts")
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of {list(LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@torch.no_grad()
def completion_log_probs(
    model: nn.Module, pairs: Sequence[Pair], pad_id: int, batch_size: int = 32
) -> list[tuple[float, float]]:
    """Summed completion log-probabilities (chosen, rejected) of each pair under a plain GPT, in eval mode."""
    from gptlab.train.losses import token_log_probs

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, float]] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        b = pair_batch(chunk, pad_id)
        logps = token_log_probs(model, b["idx"].to(device), b["targets"].to(device)).sum(1).tolist()
        n = len(chunk)
        out += list(zip(logps[:n], logps[n:], strict=True))
    model.train(was_training)
    return out


class DPOTask(ExamplesTask):
    """The DPO / IPO loss on preference pairs; validation adds preference accuracy and reward margins.

    Examples are `Pair`s; `set_reference(model)` must run (on the base model, before training) first.
    """

    def __init__(self, *args: Any, beta: float = 0.1, loss_type: str = "sigmoid", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of {list(LOSS_TYPES)}")
        if not beta > 0:
            raise ValueError(f"DPO beta must be positive, got {beta}")
        self.beta, self.loss_type = beta, loss_type
        self.has_reference = False

    def set_reference(self, model: nn.Module) -> None:
        """Score every pair once with `model` (the frozen reference: the base model, untrained); the
        two summed log-probabilities are appended to each example."""
        for examples in (self.train, self.val):
            refs = completion_log_probs(model, [p[:4] for p in examples], self.pad_id, self.eval_batch_size)
            examples[:] = [(*p[:4], *r) for p, r in zip(examples, refs, strict=True)]
        self.has_reference = True

    def prepare_model(self, model: nn.Module) -> None:
        from gptlab.train.losses import apply_token_log_probs

        apply_token_log_probs(model)

    def _collate(self, items: Sequence[tuple]) -> dict[str, Tensor]:
        if not self.has_reference:
            raise RuntimeError("DPOTask.set_reference(base_model) must run before training")
        batch = pair_batch(items, self.pad_id)
        batch["ref_logps"] = torch.tensor([p[4] for p in items] + [p[5] for p in items], dtype=torch.float32)
        return batch

    def scores(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(losses, chosen rewards, rejected rewards) per pair of the batch."""
        _, logps = model(batch["idx"], batch["targets"], log_probs=True)  # (2B, T)
        counts = (batch["targets"] != IGNORE_INDEX).sum(1).float()
        n = logps.shape[0] // 2
        seq, ref = logps.sum(1), batch["ref_logps"]
        return dpo_loss(seq[:n], seq[n:], ref[:n], ref[n:], self.beta, self.loss_type, counts[:n], counts[n:])

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return self.scores(model, batch)[0].mean()

    def tokens(self, batch: dict[str, Tensor]) -> int:
        return target_tokens(batch)

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """val_accuracy: share of pairs whose chosen reward beats the rejected one; val_margin: the mean
        reward margin; val_chosen_reward / val_rejected_reward: the mean rewards."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        for b in self.validation_batches():
            b = {k: v.to(device) for k, v in b.items()}
            _, c, r = self.scores(model, b)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        model.train(was_training)
        c, r = torch.cat(chosen), torch.cat(rejected)
        return {
            "val_accuracy": float((c > r).float().mean()),
            "val_margin": float((c - r).mean()),
            "val_chosen_reward": float(c.mean()),
            "val_rejected_reward": float(r.mean()),
        }
