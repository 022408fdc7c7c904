"""GPT-2 BPE encode throughput: gptlab vs tiktoken vs Hugging Face tokenizers, built from the same files.

The corpus is the Python standard library's own sources (offline, ~20 MB by default), one document
per file. Single-threaded: each document encoded in turn. Batch: all documents at once on every core
(gptlab and tiktoken use threads, tokenizers uses rayon). Medians of --runs timings, after a warm-up;
on a busy shared machine, --cpu-time times the 1-thread cells by process CPU time instead of wall time.

    python benchmarks/tokenizer.py [--mb 20] [--runs 5] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from gptlab.reports.table import format_table
from gptlab.tokenizer import EOT, GPT2_PATTERN, Tokenizer

DEFAULT_BPE_DIR = Path(__file__).resolve().parents[2] / "shared/fixtures/gpt2-bpe"


def stdlib_corpus(megabytes: float) -> list[str]:
    """Python standard library sources, one string per file, until `megabytes` of UTF-8."""
    docs, size = [], 0
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = file.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        size += len(text.encode())
        if size >= megabytes * 1e6:
            break
    if size < megabytes * 1e6:  # a small stdlib: repeat it
        docs = docs * int(megabytes * 1e6 / max(size, 1) + 1)
    return docs


def median_seconds(
    cases: dict[str, Callable[[], object]], runs: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median time of each case; runs interleave the cases so that drifting machine load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for run in range(runs + 1):  # run 0 warms up (caches, thread pools)
        for name, fn in cases.items():
            start = clock()
            fn()
            if run:
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def build_references(bpe_dir: Path):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    ranks = data_gym_to_mergeable_bpe_ranks(str(bpe_dir / "vocab.bpe"), str(bpe_dir / "encoder.json"))
    tik = tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )
    hf = HFTokenizer(models.BPE.from_file(str(bpe_dir / "encoder.json"), str(bpe_dir / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tik, hf


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of UTF-8")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per cell (median reported)")
    ap.add_argument(
        "--tokenizer", type=Path, default=DEFAULT_BPE_DIR, help="dir with encoder.json + vocab.bpe"
    )
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the 1-thread cells by process CPU time, not wall time (for a busy shared machine)",
    )
    args = ap.parse_args(argv)

    gptlab = Tokenizer.gpt2(args.tokenizer)
    tik, hf = build_references(args.tokenizer)
    docs = stdlib_corpus(args.mb)
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ids = gptlab.encode_batch(docs, num_threads=cores)
    assert ids == tik.encode_ordinary_batch(docs, num_threads=cores), "gptlab and tiktoken disagree"
    assert ids == [e.ids for e in hf.encode_batch(docs)], "gptlab and tokenizers disagree"
    tokens = sum(map(len, ids))
    print(
        f"{megabytes:.1f} MB, {len(docs)} documents, {tokens:,} tokens, {cores} cores, {args.runs} runs; "
        f"1-thread cells by {'CPU' if args.cpu_time else 'wall'} time, batch cells by wall time"
    )

    single = median_seconds(
        {
            "gptlab": lambda: [gptlab.encode(d) for d in docs],
            "tiktoken": lambda: [tik.encode_ordinary(d) for d in docs],
            "HF tokenizers": lambda: [hf.encode(d).ids for d in docs],
        },
        args.runs,
        time.process_time if args.cpu_time else time.perf_counter,
    )
    batch = median_seconds(
        {
            "gptlab": lambda: gptlab.encode_batch(docs, num_threads=cores),
            "tiktoken": lambda: tik.encode_ordinary_batch(docs, num_threads=cores),
            "HF tokenizers": lambda: hf.encode_batch(docs),
        },
        args.runs,
        time.perf_counter,
    )
    rows = [
        {
            "implementation": name,
            "1 thread MB/s": round(megabytes / single[name], 2),
            "vs tiktoken": f"{single['tiktoken'] / single[name]:.2f}x",
            f"batch ({cores} cores) MB/s": round(megabytes / batch[name], 2),
            "batch vs tiktoken": f"{batch['tiktoken'] / batch[name]:.2f}x",
        }
        for name in single
    ]
    print(format_table(rows, markdown=True))
    return rows


if __name__ == "__main__":
    main()
