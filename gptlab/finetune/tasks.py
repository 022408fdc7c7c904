"""Fine-tuning setups for the one training loop (gptlab/train/loop.py): classification and SFT.

Each is a `gptlab.train.task.Task`: batches addressed by global example index (epoch-shuffled, so a
resume continues exactly), a loss, the trainable parameters (those with requires_grad: all of them for
full fine-tuning, adapters + head under LoRA), `validate` metrics and `on_best` (keep the best weights).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.finetune.data import classification_batch, sft_batch, target_tokens
from gptlab.finetune.metrics import classification_metrics

BEST_WEIGHTS = "best.safetensors"


class ExamplesTask:
    """Shared parts: epoch-shuffled batches over a list of encoded examples, best-weight keeping."""

    def __init__(
        self,
        train: Sequence[Any],
        val: Sequence[Any] | None,
        pad_id: int,
        seed: int = 0,
        eval_batch_size: int = 32,
        best_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not train:
            raise ValueError("no training examples")
        self.train, self.val = list(train), list(val or [])
        self.pad_id, self.seed, self.eval_batch_size = pad_id, seed, eval_batch_size
        self.best_path = Path(best_path) if best_path is not None else None
        self._order: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.train)

    def _example(self, index: int) -> Any:
        epoch, i = divmod(index, len(self.train))
        if epoch not in self._order:
            self._order = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.train))}
        return self.train[int(self._order[epoch][i])]

    def _collate(self, items: Sequence[Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        return self._collate([self._example(i) for i in indices])

    def validation_batches(self) -> list[dict[str, Tensor]]:
        n = self.eval_batch_size
        return [self._collate(self.val[i : i + n]) for i in range(0, len(self.val), n)]

    def trainable_parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def on_best(self, model: nn.Module, row: dict[str, Any]) -> None:
        """Write the trainable weights (the whole model under full fine-tuning) to `best_path`."""
        if self.best_path is None:
            return
        from safetensors.torch import save

        from gptlab.checkpoint import atomic_write_bytes
        from gptlab.train.distributed import unwrap

        state = {
            n: p.detach().to("cpu").contiguous().clone()
            for n, p in unwrap(model).named_parameters()
            if p.requires_grad
        }
        atomic_write_bytes(self.best_path, save(state, metadata={"step": str(row.get("step"))}))


class ClassificationTask(ExamplesTask):
    """Cross-entropy on a `SequenceClassifier`; validation adds accuracy and macro-F1.

    Examples are (token ids, label index) pairs.
    """

    def __init__(self, *args: Any, num_labels: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_labels = num_labels

    def _collate(self, items: Sequence[tuple[list[int], int]]) -> dict[str, Tensor]:
        return classification_batch(items, self.pad_id)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = model(batch["idx"], batch["lengths"])  # (B, num_labels)
        return F.cross_entropy(logits.float(), batch["labels"])

    def tokens(self, batch: dict[str, Tensor]) -> int:
        return int(batch["lengths"].sum())

    @torch.no_grad()
    def predict(self, model: nn.Module, batches: Sequence[dict[str, Tensor]]) -> tuple[list[int], list[int]]:
        """(predicted, true) label indices over `batches`."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        predicted, true = [], []
        for b in batches:
            logits = model(b["idx"].to(device), b["lengths"].to(device))
            predicted += logits.argmax(-1).tolist()
            true += b["labels"].tolist()
        model.train(was_training)
        return predicted, true

    def validate(self, model: nn.Module) -> dict[str, float]:
        predicted, true = self.predict(model, self.validation_batches())
        return {f"val_{k}": v for k, v in classification_metrics(predicted, true, self.num_labels).items()}


class SFTTask(ExamplesTask):
    """Next-token loss on the completion tokens only (targets are -1 on prompt and padding).

    Examples are (input ids, targets) pairs from `gptlab.finetune.data.encode_sft`.
    """

    def _collate(self, items: Sequence[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        return sft_batch(items, self.pad_id)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        _, loss = model(batch["idx"], batch["targets"])
        return loss

    def tokens(self, batch: dict[str, Tensor]) -> int:
        return target_tokens(batch)
