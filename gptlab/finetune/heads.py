"""Task heads that share the GPT trunk (as Hugging Face's GPT2ForSequenceClassification does)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.model import GPT


class SequenceClassifier(nn.Module):
    """GPT trunk + a linear head on the hidden state of each sequence's last non-padding token.

    Batches are right-padded; with causal attention the last real token has seen the whole text and
    none of the padding, so padding never changes a prediction.
    """

    def __init__(self, trunk: GPT, num_labels: int) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {num_labels}")
        self.trunk = trunk
        self.config = trunk.config
        w = trunk.transformer.wte.weight
        self.head = nn.Linear(trunk.config.n_embd, num_labels, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def num_labels(self) -> int:
        return self.head.out_features

    def forward(self, idx: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Class logits (B, num_labels) of right-padded `idx` (B, T) with `lengths` (B,) real tokens."""
        hidden = self.trunk.features(idx)  # (B, T, C)
        B, T = idx.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=idx.device)
        if bool((lengths < 1).any()) or bool((lengths > T).any()):
            raise ValueError(f"lengths must lie in [1, {T}], got {lengths.tolist()}")
        last = hidden[torch.arange(B, device=idx.device), lengths.to(idx.device) - 1]  # (B, C)
        return self.head(last)

    def loss(self, idx: Tensor, lengths: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(mean cross-entropy, logits)."""
        logits = self(idx, lengths)
        return F.cross_entropy(logits.float(), labels.to(logits.device)), logits
