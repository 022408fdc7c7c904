"""`train.eval_tasks`: the GPT-3 paper's tasks scored during training, every `train.eval_interval` steps.

The items (the first `train.eval_tasks_items` of each task) and their few-shot prompts are fixed when
training starts, so successive scores differ only by the weights. Scoring runs on rank 0 with the
plain (unwrapped) language model; results are logged as `eval/<task>` rows of metrics.jsonl.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gptlab.train.config import TrainSection


class TrainEvalTasks:
    def __init__(self, t: TrainSection, tokenizer: Any, world_size: int) -> None:
        from gptlab.eval.suite import TaskEvaluator
        from gptlab.eval.suite_tasks import parse_tasks

        if tokenizer is None:
            raise ValueError(
                "train.eval_tasks needs the tokenizer to write prompts with; set data.tokenizer to the "
                "dataset's tokenizer directory"
            )
        if (t.strategy == "fsdp" and world_size > 1) or t.tensor_parallel > 1:
            raise ValueError(
                "train.eval_tasks scores the whole model on rank 0; it does not run under FSDP or tensor parallelism"
            )
        self.tokenizer = tokenizer
        self.evaluator = TaskEvaluator(
            parse_tasks(t.eval_tasks), t.eval_tasks_data, items=t.eval_tasks_items, shots=t.eval_tasks_shots
        )

    def __call__(self, raw_model: nn.Module) -> dict[str, float]:
        from gptlab.model import GPT

        model = raw_model if isinstance(raw_model, GPT) else getattr(raw_model, "trunk", None)
        if not isinstance(model, GPT):
            raise ValueError(f"train.eval_tasks scores a GPT language model, not a {type(raw_model).__name__}")
        was_training = model.training
        try:
            return self.evaluator(model, self.tokenizer)
        finally:
            model.train(was_training)
