"""In-context (zero-, one- and few-shot) evaluation as in GPT-3 (Brown et al. 2020, section 2).

The task format, prompt layout and scoring rules of each kind are specified in `gptlab.eval.tasks`.
Metrics per kind:
- multiple_choice: `acc` (argmax of log P(" " + choice | prompt)) and `acc_norm` (argmax of that
  log-likelihood divided by the choice's length in characters: lm-evaluation-harness's `acc_norm`,
  the per-character normalisation; GPT-3's own per-token variant is not reported).
- cloze: `acc` (the target is the greedy completion: every target token is the argmax) and
  `perplexity` = exp(-mean log P(target | prompt)) over items, as lm-eval reports for LAMBADA.
- generation: `acc` = exact match of the greedy completion (stop string removed, whitespace
  stripped) with the stripped target.

Standard error of an accuracy p over n items: sqrt(p (1 - p) / (n - 1)), the sample standard
deviation of the 0/1 scores over sqrt(n); lm-eval's `acc_stderr` is the same formula.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptlab.eval.scoring import TextTokenizer, greedy_until, loglikelihood
from gptlab.eval.tasks import Task, load_task
from gptlab.model import GPT

STDERR_FORMULA = "sqrt(p * (1 - p) / (n - 1))"


def accuracy_stderr(scores: Sequence[float]) -> float | None:
    """Standard error of the mean of 0/1 `scores`; None for fewer than 2 items."""
    n = len(scores)
    if n < 2:
        return None
    p = sum(scores) / n
    return math.sqrt(p * (1 - p) / (n - 1))


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first index on ties, like numpy


def build_prompts(task: Task, shots: int, seed: int, limit: int | None = None) -> list[str]:
    """The prompt of each test item (the first `limit`), with `shots` examples drawn by one generator
    seeded with `seed`: item i gets the same examples whatever the limit."""
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    rng = random.Random(seed)
    items = task.test[:limit]
    return [task.prompt(item, task.sample_examples(item, shots, rng)) for item in items]


def evaluate_task(
    model: GPT,
    tokenizer: TextTokenizer,
    task: Task,
    shots: int = 0,
    seed: int = 1234,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
    reuse: bool = True,
) -> dict[str, Any]:
    """Score `task`'s test items; returns metrics, their standard errors and per-item details.
    reuse=False scores every choice's whole sequence instead of computing each context once."""
    items = task.test[:limit]
    prompts = build_prompts(task, shots, seed, limit)
    delim = task.target_delimiter
    details: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    if task.kind == "multiple_choice":
        requests = [(p, delim + c) for p, item in zip(prompts, items, strict=True) for c in item.choices]
        scored = loglikelihood(model, tokenizer, requests, batch_size=batch_size, progress=progress, reuse=reuse)
        offset = 0
        for item in items:
            lls = [ll for ll, _ in scored[offset : offset + len(item.choices)]]
            offset += len(item.choices)
            pred = _argmax(lls)
            pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, item.choices, strict=True)])
            details.append(
                {
                    "loglikelihoods": lls,
                    "gold": item.gold,
                    "prediction": pred,
                    "prediction_norm": pred_norm,
                    "acc": float(pred == item.gold),
                    "acc_norm": float(pred_norm == item.gold),
                }
            )
        names = ["acc", "acc_norm"]
    elif task.kind == "cloze":
        requests = [(p, delim + item.target) for p, item in zip(prompts, items, strict=True)]
        scored = loglikelihood(model, tokenizer, requests, batch_size=batch_size, progress=progress, reuse=reuse)
        for item, (ll, greedy) in zip(items, scored, strict=True):
            details.append({"loglikelihood": ll, "target": item.target, "acc": float(greedy)})
        names = ["acc"]
        metrics["perplexity"] = math.exp(-sum(d["loglikelihood"] for d in details) / len(details))
    else:
        outputs = greedy_until(
            model,
            tokenizer,
            prompts,
            [task.stop_for(i) for i in items],
            [task.max_tokens_for(i) for i in items],
            batch_size=batch_size,
            progress=progress,
        )
        for item, text in zip(items, outputs, strict=True):
            details.append(
                {"completion": text, "target": item.target, "acc": float(text.strip() == item.target.strip())}
            )
        names = ["acc"]
    for name in names:
        scores = [d[name] for d in details]
        metrics[name] = sum(scores) / len(scores)
        metrics[f"{name}_stderr"] = accuracy_stderr(scores)
    return {
        "task": task.name,
        "kind": task.kind,
        "shots": shots,
        "seed": seed,
        "n": len(items),
        "metrics": metrics,
        "stderr": STDERR_FORMULA,
        "items": [
            {"index": i, "prompt": p, **d} for i, (p, d) in enumerate(zip(prompts, details, strict=True))
        ],
    }


def run_fewshot(
    checkpoint: str | Path,
    task: str | Path,
    shots: int = 0,
    seed: int = 1234,
    limit: int | None = None,
    out: str | Path | None = None,
    tokenizer: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """`gptlab eval fewshot`: load the checkpoint and task file, evaluate, write JSON to `out`."""
    from gptlab.checkpoint import atomic_write_text, load_model, load_tokenizer

    parsed = load_task(task)
    if shots < 0:
        raise ValueError(f"--shots must be >= 0, got {shots}")
    model = load_model(checkpoint, device=device)
    tok = load_tokenizer(tokenizer or checkpoint)
    result = evaluate_task(model, tok, parsed, shots, seed, limit, batch_size, progress)
    result = {"checkpoint": str(checkpoint), "task_file": str(task), **result}
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result
