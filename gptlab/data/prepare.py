"""Pretraining data: text files or JSONL -> token shards + manifest.json (`gptlab prepare`).

A dataset directory holds:
  manifest.json        written last, atomically: its presence means the dataset is complete
  train_00000.bin ...  raw token ids, np.memmap-able: uint16 when every id fits, else uint32
  val_00000.bin ...
  progress.json        the finished shards, so an interrupted run resumes without redoing them

Every document (see gptlab.data.documents for what counts as one, and what is skipped) is followed by
`<|endoftext|>`. The validation split is a seeded random sample of documents. A shard holds whole
documents, the next ones of its split until it reaches `shard_tokens` tokens, so each shard is a slice
of the document list that a re-run reproduces byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.checkpoint import atomic_write_bytes, atomic_write_text
from gptlab.data.documents import (
    Doc,
    Reader,
    default_corpus_files,
    default_corpus_left_out,
    default_corpus_name,
    iter_documents,
    new_counts,
    resolve_inputs,
    walk,
)
from gptlab.tokenizer import Tokenizer

FORMAT = "gptlab-tokens"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 2**24  # 32 MiB of uint16 per shard: resumable in seconds-sized pieces
_SHARD_NAME = re.compile(r"^(train|val)_\d{5}\.bin$")
_ENCODE_BATCH_CHARS = 1 << 20  # text per encode_batch call: enough for every thread, a smooth bar
__all__ = ["default_corpus_files", "iter_documents", "prepare", "resolve_inputs", "summary", "token_dtype"]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size-1) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


# ---- preparing ----------------------------------------------------------------------------------
def _split(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Sorted document indices of the validation split: >= 1 when there are >= 2 documents."""
    if val_fraction <= 0 or n_docs < 2:
        return np.zeros(0, dtype=np.int64)
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    return np.sort(np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False))


def _encoded(
    docs: Sequence[Doc], read: Callable[[Doc], str], tokenizer: Tokenizer, dtype: np.dtype, threads: int
) -> Iterator[np.ndarray]:
    """Token ids of each document followed by <|endoftext|>, in order; batches encode in threads."""
    eot = tokenizer.eot_id
    batch: list[str] = []
    chars = 0
    for k, doc in enumerate(docs):
        text = read(doc)
        batch.append(text)
        chars += len(text)
        if chars >= _ENCODE_BATCH_CHARS or k == len(docs) - 1:
            for ids in tokenizer.encode_batch(batch, num_threads=threads):
                out = np.empty(len(ids) + 1, dtype=dtype)
                out[:-1] = ids
                out[-1] = eot
                yield out
            batch, chars = [], 0


def _clear(out_dir: Path, everything: bool) -> None:
    """Remove temp files a killed run left behind and, if `everything`, all that prepare wrote here."""
    for f in out_dir.iterdir():
        ours = _SHARD_NAME.match(f.name) or f.name in (MANIFEST_FILE, PROGRESS_FILE)
        if f.is_file() and ((everything and ours) or f.name.startswith(".tmp-")):
            f.unlink()


class _Shards:
    """Commits shards (temp file + rename), then records each in progress.json."""

    def __init__(
        self, out_dir: Path, state: dict[str, Any], dtype: np.dtype, bar: Any, on_shard: Any
    ) -> None:
        self.out_dir, self.state, self.dtype, self.bar, self.on_shard = out_dir, state, dtype, bar, on_shard
        self.started, self.tokens = time.perf_counter(), 0

    def advance(self, documents: int, tokens: int = 0) -> None:
        """Progress: `documents` done, `tokens` of them tokenized in this run (0 for kept shards)."""
        self.bar.update(documents)
        if tokens:
            self.tokens += tokens
            rate = self.tokens / (time.perf_counter() - self.started)
            self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)

    def ok(self, record: dict[str, Any]) -> bool:
        file = self.out_dir / record["file"]
        return file.is_file() and file.stat().st_size == record["tokens"] * self.dtype.itemsize

    def commit(self, split: str, index: int, start: int, stop: int, parts: list[np.ndarray]) -> None:
        # From the first write until the manifest is rewritten the dataset is incomplete.
        (self.out_dir / MANIFEST_FILE).unlink(missing_ok=True)
        data = np.concatenate(parts).tobytes()
        name = shard_name(split, index)
        atomic_write_bytes(self.out_dir / name, data)
        n = len(data) // self.dtype.itemsize
        record = dict(file=name, doc_start=start, doc_stop=stop, documents=stop - start, tokens=n)
        record["sha256"] = hashlib.sha256(data).hexdigest()
        self.state["splits"][split][index : index + 1] = [record]
        atomic_write_text(self.out_dir / PROGRESS_FILE, json.dumps(self.state, indent=1))
        if self.on_shard is not None:
            self.on_shard(split, index)


def _tokenize_split(
    split: str,
    docs: list[Doc],
    shard_tokens: int,
    shards: _Shards,
    encode: Callable[[list[Doc]], Iterator[np.ndarray]],
) -> None:
    """Keep the recorded shards that are intact, rebuild the others, then continue from the last one."""
    records = shards.state["splits"][split]
    position = 0
    for index, record in enumerate(list(records)):
        start, stop = record["doc_start"], record["doc_stop"]
        if start != position or stop > len(docs):
            raise ValueError(f"{shards.out_dir / PROGRESS_FILE} is inconsistent; delete it and re-run")
        if shards.ok(record):
            shards.advance(stop - start)
        else:
            rebuilt = list(encode(docs[start:stop]))
            shards.commit(split, index, start, stop, rebuilt)
            shards.advance(stop - start, sum(p.size for p in rebuilt))
        position = stop
    parts: list[np.ndarray] = []
    n_tokens, start, index = 0, position, len(records)
    for stop, ids in enumerate(encode(docs[position:]), position + 1):
        parts.append(ids)
        n_tokens += ids.size
        shards.advance(1, ids.size)
        if n_tokens >= shard_tokens or stop == len(docs):
            shards.commit(split, index, start, stop, parts)
            parts, n_tokens, start, index = [], 0, stop, index + 1


def prepare(
    inputs: Sequence[str | os.PathLike[str]] | None,
    out_dir: str | os.PathLike[str],
    tokenizer: Tokenizer,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    jsonl_field: str = "text",
    num_workers: int | None = None,
    progress: bool = True,
    on_shard: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Tokenize `inputs` (None: the Python standard library's source) into a dataset at `out_dir`.

    Returns the manifest. Re-running with the same inputs and settings resumes: shards already on disk
    are kept, missing ones are rebuilt from their recorded document slice, and the output is identical
    to an uninterrupted run. Changed inputs or settings start over. `num_workers` threads encode
    (default: all cores). `on_shard(split, index)` is called after each shard is committed (a hook
    for tests and progress reporting; an exception it raises stops the run like an interruption).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    threads = num_workers or _cpu_count()
    if threads < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a directory")
    tokenizer_info = {
        "name": tokenizer.name,
        "fingerprint": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,  # fails early, naming the tokenizer, when it has no <|endoftext|>
    }
    dtype = token_dtype(tokenizer.vocab_size)

    # Our own output is never input (a re-run would otherwise read the shards of the first run).
    files = [f for f in resolve_inputs(inputs) if not f.is_relative_to(out_dir.resolve())]
    if not files:
        raise ValueError(f"every input file lies inside the output directory {out_dir}")
    counts, hasher = new_counts(), hashlib.sha256()
    with _bar(progress, total=len(files), unit="file", desc="scan") as bar:
        docs = [ref for ref, _ in walk(files, jsonl_field, counts, hasher, bar)]
    if not docs:
        raise ValueError(f"all {len(files)} input files are empty or binary ({counts}); nothing to tokenize")
    val_index = _split(len(docs), val_fraction, seed)
    is_val = np.zeros(len(docs), dtype=bool)
    is_val[val_index] = True
    split_docs = {"train": [d for d, v in zip(docs, is_val, strict=True) if not v]}
    split_docs["val"] = [docs[i] for i in val_index]

    settings = dict(val_fraction=val_fraction, seed=seed, shard_tokens=shard_tokens, jsonl_field=jsonl_field)
    identity = {k: v for k, v in tokenizer_info.items() if k != "name"}  # the name is a folder name
    key_data = [FORMAT, FORMAT_VERSION, settings, identity, dtype.name, hasher.hexdigest()]
    key = hashlib.sha256(json.dumps(key_data).encode()).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _read_progress(out_dir, key)
    # No matching progress: a fresh start, or inputs/settings changed since the files here were written.
    _clear(out_dir, everything=state is None)
    state = state or {"key": key, "splits": {s: [] for s in SPLITS}}

    read = Reader(files, jsonl_field)
    encode = lambda refs: _encoded(refs, read, tokenizer, dtype, threads)
    try:
        with _bar(progress, total=len(docs), unit="doc", desc="tokenize") as bar:
            shards = _Shards(out_dir, state, dtype, bar, on_shard)
            for split in SPLITS:
                _tokenize_split(split, split_docs[split], shard_tokens, shards, encode)
    finally:
        read.close()

    splits = {}
    for split in SPLITS:
        records = state["splits"][split]
        splits[split] = {
            "documents": len(split_docs[split]),
            "tokens": sum(r["tokens"] for r in records),
            "shards": [{k: r[k] for k in ("file", "tokens", "documents", "sha256")} for r in records],
        }
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "tokenizer": tokenizer_info,
        "documents": len(docs),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "splits": splits,
        "skipped": {k: counts[k] for k in ("empty_files", "binary_files", "empty_documents")},
        "replaced_bytes": counts["replaced_bytes"],
        "documents_with_replaced_bytes": counts["documents_with_replaced_bytes"],
        "sources": {
            "inputs": None if inputs is None else [str(s) for s in inputs],
            "default_corpus": default_corpus_name() if inputs is None else None,
            "default_corpus_left_out": default_corpus_left_out() if inputs is None else None,
            "files": [str(f) for f in files],
            "sha256": hasher.hexdigest(),
        },
        "settings": settings,
    }
    # Written last: a manifest exists only beside a complete set of shards.
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read_progress(out_dir: Path, key: str) -> dict[str, Any] | None:
    """The progress record of an earlier run with the same corpus and settings, else None."""
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        state = json.loads((out_dir / PROGRESS_FILE).read_text())
        if isinstance(state, dict) and state.get("key") == key:
            return state
    return None


def _bar(enabled: bool, **kw: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def summary(manifest: dict[str, Any], out_dir: str | os.PathLike[str] | None = None) -> str:
    """A few human-readable lines about a prepared dataset."""
    lines = [f"dataset {out_dir}" if out_dir else "dataset"]
    for split in SPLITS:
        s = manifest["splits"][split]
        lines.append(
            f"  {split}: {s['documents']:,} documents, {s['tokens']:,} tokens, {len(s['shards'])} shards"
        )
    tok = manifest["tokenizer"]
    lines.append(f"  dtype {manifest['dtype']}; tokenizer {tok['fingerprint']} ")
    lines[-1] += f"(vocab {tok['vocab_size']:,}, <|endoftext|> = {tok['eot_id']})"
    skipped = {k: v for k, v in manifest["skipped"].items() if v}
    if skipped or manifest["replaced_bytes"]:
        lines.append(
            f"  skipped {skipped or 'nothing'}; {manifest['replaced_bytes']:,} undecodable bytes replaced "
            f"in {manifest['documents_with_replaced_bytes']:,} documents"
        )
    left_out = (manifest.get("sources") or {}).get("default_corpus_left_out") or {}
    for why, entry in left_out.items():
        size = f"{entry['files']} files, {entry['bytes'] / 1e6:.1f} MB"
        lines.append(f"  left out of the standard library: {size} ({why})")
    return "\n".join(lines)
