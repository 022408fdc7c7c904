"""A `Task` is what changes between pretraining and each fine-tuning mode; the loop is the same.

A task says which batches to train on (addressed by global example indices, so the data position is one
integer that survives a resume and splits across ranks), which loss to minimise, which parameters
train, and what to validate on. To add a fine-tuning mode (classification, SFT, LoRA), write a Task,
build its model (e.g. a head on `GPT.features`, or adapters with the base frozen) and call
`gptlab.train.loop.train(cfg, model, task, run_dir)`; nothing in the loop is copied.

Optional methods the loop calls when a task has them (see gptlab/finetune/tasks.py):
  validate(model) -> dict[str, float]   metrics beyond the loss, logged with each evaluation
                                        ('val_accuracy', ...); `train.early_stopping_metric` may name one
  on_best(model, row) -> None           rank 0, after an evaluation that improved that metric
  prepare_model(model) -> None          on the plain model before activation checkpointing, compile and
                                        DDP / FSDP wrap it (pretraining swaps in the fused loss here)
  train_metrics() -> dict[str, float]   merged into each logged row (RL: the mean reward of the rollouts)
  validates_without_batches = True      evaluate by `validate` alone when `validation_batches` is empty
                                        (RL generates: no validation loss)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Task(Protocol):
    def batch(self, indices: Sequence[int]) -> Any:
        """The examples with these global indices: a tensor, or a tuple / dict of tensors (moved to the
        device by the loop). Index i of epoch e is example i - e * len(data) in that epoch's order."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Scalar mean loss over the batch; `model` may be wrapped (DDP, FSDP, compile), so call it as
        `model(...)`: its forward is what the wrappers hook."""
        ...

    def tokens(self, batch: Any) -> int:
        """Tokens the batch trains on, for throughput and MFU."""
        ...

    def validation_batches(self) -> list[Any]:
        """A fixed list of batches the validation loss averages over (may be empty)."""
        ...

    def trainable_parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs the optimizer updates; the rest are frozen."""
        ...


def to_device(batch: Any, device: torch.device) -> Any:
    return _map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def batch_rows(batch: Any) -> int:
    """The number of examples in a batch: the shared first dimension of its tensors."""
    sizes = {t.shape[0] for t in _tensors(batch)}
    if len(sizes) != 1:
        raise ValueError(f"a batch's tensors must share their first (example) dimension, got sizes {sorted(sizes)}")
    return sizes.pop()


def split_rows(batch: Any, part: int, parts: int) -> Any:
    """Part `part` of `parts` contiguous, near-equal slices of a batch along its example dimension
    (torch.tensor_split's division; a part may be empty when the batch has fewer rows than parts)."""
    n = batch_rows(batch)
    return row_slice(batch, part * n // parts, (part + 1) * n // parts)


def row_slice(batch: Any, begin: int, end: int) -> Any:
    """Examples begin..end-1 of a batch (fewer, or none, past its end)."""
    return _map_tensors(batch, lambda t: t[begin:end])


def _tensors(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, list | tuple):
        return [t for v in batch for t in _tensors(v)]
    return []


def _map_tensors(batch: Any, fn: Any) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: _map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


class LanguageModelingTask:
    """Next-token prediction on a prepared token dataset (pretraining): every parameter trains."""

    def __init__(
        self,
        dataset_dir: str | os.PathLike[str],
        seq_len: int,
        seed: int = 0,
        eval_batch_size: int = 8,
        eval_batches: int = 20,
        fused_loss: bool = True,
    ) -> None:
        from gptlab.data.loader import TokenStream, read_manifest

        self.dataset_dir = dataset_dir
        self.stream = TokenStream(dataset_dir, split="train", seq_len=seq_len, seed=seed)
        self.seq_len = seq_len
        self.fused_loss = fused_loss
        self._eval = (eval_batch_size, eval_batches)
        self._val: list[Any] | None = None
        self.has_val = read_manifest(dataset_dir)["splits"].get("val", {}).get("tokens", 0) > seq_len

    @property
    def vocab_size(self) -> int:
        return self.stream.vocab_size

    def prepare_model(self, model: nn.Module) -> None:
        if self.fused_loss:  # the loss without the (B*T, vocab) logits: less memory traffic, same value
            from gptlab.train.losses import apply_fused_cross_entropy

            apply_fused_cross_entropy(model)

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        return self.stream.batch(indices)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        _, loss = model(x, y)
        return loss

    def tokens(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[0].numel()

    def validation_batches(self) -> list[Any]:
        """`eval_batches` batches spread evenly over the whole validation split."""
        if self._val is None:
            from gptlab.data.loader import validation_batches

            size, count = self._eval
            self._val = validation_batches(self.dataset_dir, self.seq_len, size, count) if self.has_val else []
        return self._val

    def trainable_parameters(self, model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
        return model.named_parameters()
