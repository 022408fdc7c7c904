"""The GPT-3 paper's evaluation suite: zero-, one- and few-shot scores of its standard tasks.

Task data: `gptlab.eval.suite_data`; prompt formats and scoring rules: `gptlab.eval.suite_tasks`.
A K-shot prompt is K solved items from the task's train split (the scored split for LAMBADA, which has
none), drawn by a generator seeded with (seed, item index) and never the tested item, joined by blank
lines, then the item (paper section 2.4: "K examples ... delimited by 1 or 2 newlines"); a task's header
(LAMBADA's "Fill in blank:") opens the paper style's prompt when it has examples. The lm-eval
style draws as lm-eval's sampler does (one generator seeded once, K draws per item in order), so its
few-shot prompts are lm-eval's own.
All multiple-choice requests of a run go to the scorer at once: each distinct context (examples +
question) is computed once and every completion forks its blocks (`gptlab.eval.scoring.score_shared`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.eval.fewshot import accuracy_stderr
from gptlab.eval.scoring import TextTokenizer, encode_pair, greedy_until, score_pairs
from gptlab.eval.suite_data import Doc, load_split
from gptlab.eval.suite_tasks import STYLES, Item, TaskSpec, exact_match, task_spec
from gptlab.model import GPT

FEWSHOT_DELIMITER = "\n\n"
MAX_ANSWER_TOKENS = 32  # TriviaQA answers are a few words; the paper does not state its limit


@dataclass
class Prompted:
    """A task's scored items with their few-shot prefixes: fixed once, scored many times (training)."""

    spec: TaskSpec
    items: list[Item]
    prefixes: list[str]
    shots: int
    style: str


def build(
    spec: TaskSpec,
    test: Sequence[Doc],
    train: Sequence[Doc],
    shots: int,
    style: str = "paper",
    seed: int = 1234,
    limit: int | None = None,
) -> Prompted:
    """Items (the first `limit` of `test`) and their `shots`-example prefixes."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    fewshot = shots > 0
    chosen = list(test[:limit])
    items = [spec.format(doc, style, fewshot) for doc in chosen]
    pool, own = (train, False) if train else (test, True)
    if shots and len(pool) - own < shots:
        raise ValueError(
            f"task {spec.name}: {len(pool) - own} items to draw examples from, fewer than the {shots} shots "
            "asked for; lower the shots"
        )
    prefixes = []
    shared = random.Random(seed)  # lm-eval's sampler: one generator drawn from item after item
    for i, item in enumerate(items):
        if not shots:
            prefixes.append("")
            continue
        if style == "lm-eval":  # its draws exactly: K, or K + 1 less the item where its sampler is given it
            picks = shared.sample(range(len(pool)), shots + spec.lm_eval_extra_draw)
        else:  # each item's examples on their own, whatever items come before it
            picks = random.Random(seed * 1_000_003 + i).sample(range(len(pool)), min(len(pool), shots + 1))
        examples = [spec.format(pool[j], style, fewshot) for j in picks]
        # never the tested item; lm-eval removes it only where it draws K + 1, so its LAMBADA (examples
        # from the scored split, K draws) can show an item as its own example
        if style != "lm-eval" or spec.lm_eval_extra_draw:
            examples = [e for j, e in zip(picks, examples, strict=True) if not ((own and j == i) or e == item)]
        if len(examples) < shots and style == "lm-eval":  # as lm-eval: draw again from the pool less the item
            rest = [j for j in range(len(pool)) if not (own and j == i)]
            examples = [spec.format(pool[j], style, fewshot) for j in shared.sample(rest, shots)]
        header = [spec.fewshot_header] if spec.fewshot_header and style == "paper" else []
        prefixes.append(FEWSHOT_DELIMITER.join(header + [e.example() for e in examples[:shots]]) + FEWSHOT_DELIMITER)
    return Prompted(spec, items, prefixes, shots, style)


def score(
    model: GPT,
    tokenizer: TextTokenizer,
    prompted: Prompted,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics (with standard errors) and per-item details of one task at one number of shots."""
    spec, items, prefixes = prompted.spec, prompted.items, prompted.prefixes
    if spec.kind == "generation":
        outputs = greedy_until(
            model, tokenizer, [p + it.contexts[0] for p, it in zip(prefixes, items, strict=True)],
            [spec.stop(prompted.style)] * len(items), [MAX_ANSWER_TOKENS] * len(items),
            batch_size=batch_size, progress=progress, **spec.decoding(prompted.style),
        )  # fmt: skip
        details = [{"completion": o, "em": float(exact_match(o, it.answers))} for o, it in zip(outputs, items)]
        return _summary(prompted, details, ["em"], {})
    pairs = []
    for prefix, item in zip(prefixes, items, strict=True):
        for context, continuation in zip(item.contexts, item.continuations, strict=True):
            pairs.append(encode_pair(tokenizer, prefix + context, continuation))
            if spec.answer_context is not None:
                pairs.append(encode_pair(tokenizer, spec.answer_context, continuation))
    desc = f"{spec.name} {prompted.shots}-shot"
    scored = iter(score_pairs(model, pairs, batch_size=batch_size, progress=progress, desc=desc))
    tokens = iter(len(continuation) for _, continuation in pairs)
    details = []
    for item in items:
        lls, greedy, counts, unconditional = [], [], [], []
        for _ in item.continuations:
            ll, is_greedy = next(scored)
            lls.append(ll)
            greedy.append(is_greedy)
            counts.append(next(tokens))
            if spec.answer_context is not None:
                unconditional.append(next(scored)[0])
                next(tokens)
        details.append(_item_scores(spec, item, lls, greedy, counts, unconditional))
    if spec.kind == "cloze":
        extra = {"ppl": math.exp(-sum(d["loglikelihoods"][0] for d in details) / len(details))}
        return _summary(prompted, details, ["acc"], extra)
    names = ["acc", "acc_token", "acc_char"] + (["acc_uncond"] if spec.answer_context else [])
    return _summary(prompted, details, names if spec.kind == "multiple_choice" else ["acc"], {})


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first index on ties, like numpy


def _item_scores(
    spec: TaskSpec, item: Item, lls: list[float], greedy: list[bool], counts: list[int], unconditional: list[float]
) -> dict[str, Any]:
    d: dict[str, Any] = {"loglikelihoods": lls, "gold": item.gold}
    if spec.kind == "cloze":
        d["acc"] = float(greedy[0])
        return d
    d["acc"] = float(_argmax(lls) == item.gold)
    d["acc_token"] = float(_argmax([ll / n for ll, n in zip(lls, counts)]) == item.gold)
    d["acc_char"] = float(_argmax([ll / len(c) for ll, c in zip(lls, item.choices)]) == item.gold)
    if unconditional:
        d["unconditional"] = unconditional
        d["acc_uncond"] = float(_argmax([a - b for a, b in zip(lls, unconditional)]) == item.gold)
    return d


def _summary(
    prompted: Prompted, details: list[dict[str, Any]], names: list[str], extra: dict[str, float]
) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for name in names:
        values = [d[name] for d in details]
        metrics[name] = sum(values) / len(values)
        metrics[f"{name}_stderr"] = accuracy_stderr(values)
    metrics.update(extra)
    spec = prompted.spec
    return {
        "task": spec.name,
        "shots": prompted.shots,
        "style": prompted.style,
        "n": len(details),
        "metric": spec.metric,
        "value": metrics[spec.metric],
        "stderr": metrics[f"{spec.metric}_stderr"],
        "metrics": metrics,
        "items": [{"prompt": p + it.contexts[it.gold], **d}
                  for p, it, d in zip(prompted.prefixes, prompted.items, details, strict=True)],
    }  # fmt: skip


def evaluate_suite_task(
    model: GPT,
    tokenizer: TextTokenizer,
    task: str,
    shots: int = 0,
    data: str | Path | None = None,
    style: str = "paper",
    seed: int = 1234,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """One task at one number of shots, its data read from `data` (see `gptlab.eval.suite_data`)."""
    spec = task_spec(task)
    test = load_split(task, "test", data)
    train = load_split(task, "train", data) if shots else []
    return score(model, tokenizer, build(spec, test, train, shots, style, seed, limit), batch_size, progress)


class TaskEvaluator:
    """Chosen tasks on a fixed subset, prompts built once: what training runs at every evaluation.
    Calling it returns {"eval/<task>": the paper's metric} (and "eval/lambada_openai_ppl")."""

    def __init__(
        self, tasks: Sequence[str], data: str | Path | None, items: int = 100, shots: int = 0, seed: int = 1234
    ) -> None:
        self.prompted = []
        for task in tasks:
            spec = task_spec(task)
            test = load_split(task, "test", data)
            train = load_split(task, "train", data) if shots else []
            self.prompted.append(build(spec, test, train, shots, "paper", seed, items))

    def __call__(self, model: GPT, tokenizer: TextTokenizer, batch_size: int = 16) -> dict[str, float]:
        out: dict[str, float] = {}
        for prompted in self.prompted:
            r = score(model, tokenizer, prompted, batch_size)
            out[f"eval/{r['task']}"] = r["value"]
            if "ppl" in r["metrics"]:
                out[f"eval/{r['task']}_ppl"] = r["metrics"]["ppl"]
        return out
