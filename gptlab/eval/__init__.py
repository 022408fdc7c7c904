"""Evaluation: sliding-window perplexity, few-shot tasks, and an lm-evaluation-harness adapter.

`gptlab.eval.lm_eval_adapter` is not imported here: it needs the `eval` extra (lm-eval).
"""

from __future__ import annotations

from gptlab.eval.fewshot import accuracy_stderr, evaluate_task, run_fewshot
from gptlab.eval.perplexity import PerplexityResult, perplexity, run_perplexity, sliding_windows
from gptlab.eval.scoring import encode_pair, greedy_until, loglikelihood, score_pairs, score_tokens
from gptlab.eval.tasks import Task, TaskItem, load_task, make_example_tasks, write_task

__all__ = [
    "PerplexityResult",
    "Task",
    "TaskItem",
    "accuracy_stderr",
    "encode_pair",
    "evaluate_task",
    "greedy_until",
    "load_task",
    "loglikelihood",
    "make_example_tasks",
    "perplexity",
    "run_fewshot",
    "run_perplexity",
    "score_pairs",
    "score_tokens",
    "sliding_windows",
    "write_task",
]
