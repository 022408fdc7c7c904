"""Sentence embeddings from a GPT: the mean of the final hidden states (after `ln_f`, what the LM head
reads) over a text's tokens, L2-normalised, so a dot product is the cosine similarity.

Mean pooling rather than the last token's state: in a causal model only the last position has seen the
whole text, but its state is shaped to predict the next token; averaging every position (as
sentence-transformers does by default) weighs the whole text evenly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gptlab.model import GPT


@torch.no_grad()
def embed(model: GPT, sequences: Sequence[Sequence[int]]) -> Tensor:
    """(N, n_embd) float32 unit vectors, one per token sequence (each 1..n_ctx tokens)."""
    n_ctx = model.config.n_ctx
    device = model.transformer.wte.weight.device
    out = []
    for i, ids in enumerate(sequences):
        if not 0 < len(ids) <= n_ctx:
            raise ValueError(f"sequence {i} has {len(ids)} tokens; embeddings take 1 to {n_ctx}")
        hidden = model.features(torch.tensor([list(ids)], device=device))[0].float()  # (T, C)
        out.append(torch.nn.functional.normalize(hidden.mean(0), dim=0))
    return torch.stack(out).cpu()
