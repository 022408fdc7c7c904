"""RL with verifiable rewards as a Task of the one loop: REINFORCE with a baseline, and GRPO.

Each optimizer step takes `batch_size` prompts; `batch(indices)` samples `group_size` completions of
each with gptlab's inference engine (batched rows over a paged KV cache, on the CPU kernels where they
build), scores them with the reward, and turns rewards into advantages:
  grpo       (r - mean of the prompt's group) / (std of the group + 1e-4)  (Shao et al. 2024,
             arXiv:2402.03300); loss per token -min(rho A, clip(rho, 1 +- clip) A) + kl_coef * KL,
             rho = pi / pi_old, averaged over each completion's tokens, then over completions
  reinforce  r - the mean reward of the group's other samples (a leave-one-out baseline, Kool et al.
             2019; with group_size 1, of the batch's other prompts); loss -A log pi(completion)
             + kl_coef * KL summed over the completion
KL is the unbiased estimator exp(q) - q - 1, q = log pi_ref - log pi (Schulman 2020, as GRPO uses), to
a frozen copy of the base. One update per rollout batch, as GRPO's mu = 1: pi_old is the policy that
sampled, so rho is 1 in value and the clip never binds; it is the same objective that would clip
further updates on the same rollouts. Completion log-probabilities come from `linear_log_probs` (no
(rows x length x vocabulary) logits). The rollout of step s is seeded by the prompts' global indices,
so a resumed run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gptlab.finetune.data import IGNORE_INDEX, pad_right, read_jsonl, target_tokens
from gptlab.finetune.rewards import Reward, load_reward, score
from gptlab.finetune.tasks import ExamplesTask

ALGORITHMS = ("grpo", "reinforce")


@dataclass
class RLConfig:
    """What `gptlab finetune --task rl` reads besides the common fine-tuning flags."""

    prompts: str | None = None
    """JSONL of {"prompt", ...} records (plus the fields the reward reads, e.g. "answer")."""
    reward: str = "exact_match"
    """exact_match, numeric, regex:PATTERN, regex, or a Python callable module:function / file.py:function."""
    algorithm: str = "grpo"
    """'grpo' or 'reinforce'."""
    group_size: int = 8
    """Completions sampled per prompt (GRPO's G)."""
    max_new_tokens: int = 32
    """Most tokens per completion."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    kl_coef: float = 0.04
    """Weight of the KL penalty to the reference (GRPO's beta, 0.04 in the paper); 0: no reference model."""
    clip: float = 0.2
    """GRPO's epsilon: the ratio is clipped to [1 - clip, 1 + clip]."""

    def __post_init__(self) -> None:
        if self.prompts is None:
            raise ValueError("--task rl needs prompts: pass --prompts FILE.jsonl")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown RL algorithm {self.algorithm!r}; choose one of {list(ALGORITHMS)}")
        if self.group_size < 1 or (self.algorithm == "grpo" and self.group_size < 2):
            raise ValueError(f"group_size must be >= 2 for grpo (>= 1 for reinforce), got {self.group_size}")
        if self.max_new_tokens < 1 or not self.temperature > 0 or self.kl_coef < 0 or not self.clip > 0:
            raise ValueError(
                f"need max_new_tokens >= 1, temperature > 0, kl_coef >= 0, clip > 0; got {self.max_new_tokens}, "
                f"{self.temperature}, {self.kl_coef}, {self.clip}"
            )


Prompt = tuple[list[int], dict[str, Any]]
"""(prompt token ids, the JSONL record)."""


def load_prompts(path: str | os.PathLike[str], tokenizer: Any, n_ctx: int, max_new_tokens: int,
                 field: str | None) -> list[Prompt]:
    """Encode each record's prompt; errors name file:line (a missing reward field, a prompt too long)."""
    out = []
    for number, record in read_jsonl(path, ("prompt",) + ((field,) if field else ())):
        where = f"{path}:{number}"
        if not isinstance(record["prompt"], str):
            raise ValueError(f"{where}: field 'prompt' must be a string, got {type(record['prompt']).__name__}")
        ids = tokenizer.encode(record["prompt"]) or [tokenizer.eot_id]
        if len(ids) + max_new_tokens > n_ctx:
            raise ValueError(
                f"{where}: the prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"context of {n_ctx}; shorten it or lower --max-new-tokens"
            )
        out.append((ids, record))
    return out


def advantages(rewards: Tensor, group_size: int, algorithm: str) -> Tensor:
    """Per-completion advantages from rewards (prompts * group_size,), grouped by prompt."""
    groups = rewards.view(-1, group_size)  # (prompts, G)
    if algorithm == "grpo":
        return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).flatten()
    if group_size > 1:  # leave-one-out: each sample's baseline is the mean of the others
        return (groups - (groups.sum(1, keepdim=True) - groups) / (group_size - 1)).flatten()
    n = rewards.numel()
    return rewards - (rewards.sum() - rewards) / (n - 1) if n > 1 else rewards


def policy_loss(logps: Tensor, targets: Tensor, advantage: Tensor, cfg: RLConfig,
                ref_logps: Tensor | None = None, old_logps: Tensor | None = None) -> Tensor:
    """The RL objective (module doc) from token log-probs (N, T) of the targets (-1 where not a
    completion token) and advantages (N,). `old_logps` default: the current ones, detached (on-policy)."""
    mask = (targets != IGNORE_INDEX).float()
    counts = mask.sum(1).clamp(min=1)
    kl = torch.zeros_like(logps)
    if ref_logps is not None and cfg.kl_coef > 0:
        q = ref_logps - logps
        kl = torch.exp(q) - q - 1
    if cfg.algorithm == "grpo":
        old = logps.detach() if old_logps is None else old_logps
        ratio = torch.exp(logps - old)
        A = advantage[:, None]
        surrogate = torch.minimum(ratio * A, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * A)
        per_token = -surrogate + cfg.kl_coef * kl
        return ((per_token * mask).sum(1) / counts).mean()
    per_sequence = -advantage * (logps * mask).sum(1) + cfg.kl_coef * (kl * mask).sum(1)
    return per_sequence.mean()


def rollout_model(policy: nn.Module) -> nn.Module:
    """A frozen inference copy of the policy: LoRA merged, on gptlab's CPU kernels where they build."""
    from gptlab.finetune.lora import LoRALinear, merge_lora
    from gptlab.infer.prepare import prepare_model

    snapshot = copy.deepcopy(policy)
    snapshot.__dict__.pop("forward", None)  # a loss patch bound to the policy (apply_token_log_probs)
    if any(isinstance(m, LoRALinear) for m in snapshot.modules()):
        merge_lora(snapshot)
    snapshot.requires_grad_(False).eval()
    if snapshot.transformer.wte.weight.device.type == "cpu":
        prepare_model(snapshot)  # float32 kernels: the same weights, log-probs within float32 rounding
    return snapshot


class RLTask(ExamplesTask):
    """Rollouts, rewards and the policy-gradient loss; validation is the mean reward of greedy
    completions of the validation prompts (`val_reward`)."""

    validates_without_batches = True

    def __init__(self, train: Sequence[Prompt], val: Sequence[Prompt] | None, *, cfg: RLConfig, reward: Reward,
                 tokenizer: Any, reference: nn.Module | None, **kwargs: Any) -> None:
        super().__init__(train, val, **kwargs)
        self.cfg, self.reward, self.tokenizer, self.reference = cfg, reward, tokenizer, reference
        self.policy: nn.Module | None = None
        self._snapshot: tuple[list[Tensor], nn.Module] | None = None
        self._stats = torch.zeros(3, dtype=torch.float64)  # reward sum, completions, completion tokens

    def prepare_model(self, model: nn.Module) -> None:
        from gptlab.train.losses import apply_token_log_probs

        self.policy = model  # the plain module: rollouts read its current weights
        apply_token_log_probs(model)
        if self.reference is not None:
            self.reference.to(model.transformer.wte.weight.device)

    def sampler(self) -> nn.Module:
        """The rollout copy of the policy, rebuilt whenever an optimizer step changed its weights."""
        if self.policy is None:
            raise RuntimeError("RLTask.prepare_model(model) must run before rollouts")
        # Compared by value: fused AdamW updates parameters without bumping their version counters.
        trained = [p for p in self.policy.parameters() if p.requires_grad]
        if self._snapshot is None or not all(
            torch.equal(a, b) for a, b in zip(self._snapshot[0], trained, strict=True)
        ):
            self._snapshot = ([p.detach().clone() for p in trained], rollout_model(self.policy))
        return self._snapshot[1]

    def rollout(self, prompts: Sequence[Prompt], seeds: Sequence[int], greedy: bool = False) -> list[Any]:
        """`Completion`s (group_size per prompt, in order; one per prompt when greedy) with token log-probs."""
        from gptlab.infer.generate import decode_rows, engine_for
        from gptlab.infer.rows import make_rows
        from gptlab.infer.sampling import SamplingParams, make_generator

        model = self.sampler()
        c = self.cfg
        params = SamplingParams(
            max_new_tokens=c.max_new_tokens, temperature=0.0 if greedy else c.temperature,
            n=1 if greedy else c.group_size, logprobs=0,
        ).validate()
        ids = [p[0] for p in prompts]
        engine = engine_for(model, ids, params)
        rows = make_rows(ids, params, self.tokenizer)
        for row in rows:  # each prompt its own streams: samples differ across prompts of one batch
            row.generator = make_generator(seeds[row.prompt_index], row.sample)
        try:
            for _ in decode_rows(engine, rows, self.tokenizer.eot_id):
                pass
        finally:
            for row in rows:
                if row.seq is not None:
                    engine.free(row.seq)
        return [row.completion() for row in rows]

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        prompts = [self._example(i) for i in indices]
        seeds = [self.seed * 1_000_003 + i for i in indices]  # the global index: a resume replays it
        completions = self.rollout(prompts, seeds)
        G = self.cfg.group_size
        examples = [prompts[k // G][1] for k in range(len(completions))]
        rewards = torch.tensor(score(self.reward, [c.text for c in completions], examples), dtype=torch.float32)
        xs, ys, engine_logps = [], [], []
        for k, c in enumerate(completions):
            prompt = prompts[k // G][0]
            ended = [self.tokenizer.eot_id] if c.finish_reason == "stop" else []
            seq = prompt + c.token_ids + ended
            xs.append(seq[:-1])
            ys.append([IGNORE_INDEX] * (len(prompt) - 1) + seq[len(prompt) :])
            # The engine reports the sampled tokens' log-probs; the end-of-text token's is not among them.
            engine_logps.append([float("nan")] * (len(prompt) - 1) + [lp.logprob for lp in c.logprobs] + [
                float("nan")] * len(ended))
        batch = {
            "idx": pad_right(xs, self.pad_id),
            "targets": pad_right(ys, IGNORE_INDEX),
            "advantages": advantages(rewards, G, self.cfg.algorithm),
            "rewards": rewards,
        }
        T = batch["idx"].shape[1]
        batch["rollout_logps"] = torch.tensor([r + [float("nan")] * (T - len(r)) for r in engine_logps])
        if self.reference is not None:
            from gptlab.train.losses import token_log_probs

            device = self.reference.transformer.wte.weight.device
            with torch.no_grad():
                batch["ref_logps"] = token_log_probs(
                    self.reference, batch["idx"].to(device), batch["targets"].to(device)
                ).cpu()
        self._stats += torch.tensor([float(rewards.sum()), len(completions), target_tokens(batch)], dtype=torch.float64)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        _, logps = model(batch["idx"], batch["targets"], log_probs=True)  # (N, T) float32
        return policy_loss(logps, batch["targets"], batch["advantages"], self.cfg, batch.get("ref_logps"))

    def tokens(self, batch: dict[str, Tensor]) -> int:
        return target_tokens(batch)

    def validation_batches(self) -> list[Any]:
        return []  # validation generates: see validate

    def train_metrics(self) -> dict[str, float]:
        """Mean reward and completion length of the rollouts since the last call (all ranks)."""
        import torch.distributed as dist

        stats = self._stats.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        self._stats.zero_()
        if stats[1] == 0:
            return {}
        return {"reward": float(stats[0] / stats[1]), "completion_tokens": float(stats[2] / stats[1])}

    @torch.no_grad()
    def validate(self, model: nn.Module) -> dict[str, float]:
        """val_reward: the mean reward of the greedy completion of each validation prompt."""
        rewards: list[float] = []
        n = self.eval_batch_size
        for start in range(0, len(self.val), n):
            chunk = self.val[start : start + n]
            completions = self.rollout(chunk, [0] * len(chunk), greedy=True)
            rewards += score(self.reward, [c.text for c in completions], [p[1] for p in chunk])
        return {"val_reward": sum(rewards) / len(rewards)} if rewards else {}


def build_rl_task(cfg: RLConfig, trunk: nn.Module, tokenizer: Any, val_file: str | None, **common: Any) -> RLTask:
    """The task for `gptlab finetune --task rl`; the reference is a frozen copy of `trunk` (the base)."""
    reward, field = load_reward(cfg.reward)
    n_ctx = trunk.config.n_ctx
    train = load_prompts(cfg.prompts, tokenizer, n_ctx, cfg.max_new_tokens, field)
    val = load_prompts(val_file, tokenizer, n_ctx, cfg.max_new_tokens, field) if val_file else None
    reference = None
    if cfg.kl_coef > 0:
        reference = copy.deepcopy(trunk).requires_grad_(False).eval()
    return RLTask(train, val, cfg=cfg, reward=reward, tokenizer=tokenizer, reference=reference, **common)
