"""Fixed-length training sequences from a prepared dataset, addressed by one global integer.

The training position is the next global sequence index i. Sequence i belongs to epoch
e = i // len(stream) and reads chunk perm_e[i % len(stream)], where perm_e is
`np.random.default_rng([seed, e]).permutation(len(stream))`. Chunk c covers tokens
[c * seq_len, c * seq_len + seq_len + 1) of the split's shards read end to end, so x = tokens[:-1] and
y = tokens[1:]. Rank r of W takes `global_batch_indices(position, global_batch, r, W)`: the ranks'
slices are disjoint and their union is the single-process batch, whatever W is.

Shards are memory-mapped read-only; only the requested tokens are copied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.data.prepare import FORMAT, MANIFEST_FILE, SPLITS

__all__ = ["TokenStream", "global_batch_indices", "read_manifest", "validation_batches"]


def read_manifest(dataset_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a prepared dataset; errors name the file and say to run `gptlab prepare`."""
    file = Path(dataset_dir) / MANIFEST_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: the dataset is missing or incomplete; "
            f"run `gptlab prepare ... --out {dataset_dir}` first"
        )
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is corrupted ({e}); run `gptlab prepare` again to rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "splits" not in manifest:
        raise ValueError(f"{file} is not a gptlab token dataset manifest; run `gptlab prepare` to make one")
    return manifest


class TokenStream:
    """Fixed-length training sequences from a prepared dataset split, addressed by a global index."""

    def __init__(
        self, dataset_dir: str | os.PathLike[str], split: str = "train", seq_len: int = 256, seed: int = 0
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.dataset_dir, self.split, self.seq_len, self.seed = Path(dataset_dir), split, seq_len, seed
        self.manifest = read_manifest(dataset_dir)
        if split not in self.manifest["splits"]:
            raise ValueError(
                f"split {split!r} is not in {self.dataset_dir}; it has {sorted(self.manifest['splits'])}"
            )
        self.dtype = np.dtype(self.manifest["dtype"])
        self._open_shards()
        # _starts[k] = global token offset of shard k; the final entry is the split's size.
        self._starts = np.cumsum([0, *(len(s) for s in self._shards)], dtype=np.int64)
        self.n_tokens = int(self._starts[-1])
        self._n = (self.n_tokens - 1) // seq_len if self.n_tokens else 0
        if self._n < 1:
            raise ValueError(
                f"the {split!r} split of {self.dataset_dir} has {self.n_tokens:,} tokens, fewer than one "
                f"sequence of seq_len {seq_len} + 1; use a smaller seq_len or prepare more data"
                + (" (or a larger --val-fraction)" if split == "val" else "")
            )
        self._permutations: dict[int, np.ndarray] = {}

    def _open_shards(self) -> None:
        self._shards: list[np.memmap] = []
        for shard in self.manifest["splits"][self.split]["shards"]:
            file = self.dataset_dir / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            size = file.stat().st_size if file.is_file() else None
            if size != expected:
                found = "missing" if size is None else f"{size:,} bytes"
                raise ValueError(
                    f"shard {file} is {found}, expected {expected:,} bytes ({shard['tokens']:,} tokens); "
                    "run `gptlab prepare` again with the same arguments to repair the dataset"
                )
            self._shards.append(np.memmap(file, dtype=self.dtype, mode="r"))

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies its data; a DataLoader worker reopens the files instead.
        return {k: v for k, v in self.__dict__.items() if k not in ("_shards", "_permutations")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _permutations={})
        self._open_shards()

    @property
    def tokenizer(self) -> dict[str, Any]:
        """Identity of the tokenizer the data was made with: fingerprint, vocab_size, eot_id."""
        return self.manifest["tokenizer"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.manifest["tokenizer"]["eot_id"])

    def __len__(self) -> int:
        """Sequences per epoch."""
        return self._n

    def permutation(self, epoch: int) -> np.ndarray:
        """Chunk order of `epoch`: the same for the same (seed, epoch) on every rank and run."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch spans at most two epochs
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self._n)
        return self._permutations[epoch]

    def chunk(self, index: int) -> int:
        """The chunk that global sequence `index` reads."""
        if index < 0:
            raise ValueError(f"sequence index must be >= 0, got {index}")
        epoch, offset = divmod(int(index), self._n)
        return int(self.permutation(epoch)[offset])

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split, read across shard boundaries."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise ValueError(f"token range [{start}, {stop}) is outside the split's [0, {self.n_tokens})")
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts, position = [], start
        for k in range(first, len(self._shards)):
            if position >= stop:
                break
            begin = position - int(self._starts[k])
            end = min(stop, int(self._starts[k + 1])) - int(self._starts[k])
            parts.append(self._shards[k][begin:end])
            position += end - begin
        return np.concatenate(parts) if len(parts) != 1 else np.array(parts[0])

    def chunks(self, chunks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (len(chunks), seq_len) int64 for explicit chunk numbers (no shuffling)."""
        rows = np.empty((len(chunks), self.seq_len + 1), dtype=np.int64)
        for row, c in enumerate(chunks):
            if not 0 <= c < self._n:
                raise ValueError(f"chunk {c} is outside [0, {self._n})")
            rows[row] = self.tokens(c * self.seq_len, c * self.seq_len + self.seq_len + 1)
        data = torch.from_numpy(rows)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y int64 (len(indices), seq_len) for global sequence indices; y is x shifted by one token."""
        return self.chunks([self.chunk(i) for i in indices])

    def __repr__(self) -> str:
        return (
            f"TokenStream({str(self.dataset_dir)!r}, split={self.split!r}, seq_len={self.seq_len}, "
            f"n_tokens={self.n_tokens:,}, sequences={self._n:,})"
        )


def global_batch_indices(position: int, global_batch: int, rank: int = 0, world_size: int = 1) -> range:
    """Rank `rank`'s share of the global batch that starts at sequence `position`."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
    per_rank = global_batch // world_size
    return range(position + rank * per_rank, position + (rank + 1) * per_rank)


def validation_batches(
    dataset_dir: str | os.PathLike[str], seq_len: int, batch_size: int, max_batches: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 'val' split as unshuffled sequences in batches of `batch_size` (the last may be smaller), at
    most `max_batches` of them (None: all). When that limit leaves sequences out, the chosen ones are
    spaced evenly over the split: the first few alone would measure only its first documents (a data
    table can read as 2 nats easier than the split's mean). Deterministic: the same list on every call."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    stream = TokenStream(dataset_dir, split=SPLITS[1], seq_len=seq_len)
    n = len(stream)
    want = n if max_batches is None else min(n, max_batches * batch_size)
    picks = [i * n // want for i in range(want)]  # all of them, in order, when want == n
    return [stream.chunks(picks[start : start + batch_size]) for start in range(0, want, batch_size)]
