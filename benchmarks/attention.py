"""Locally banded (GPT-3 sparse layers) vs dense causal attention: time per forward at long context.

Dense causal attention costs O(T^2) per layer. The banded layers cut the sequence into blocks of
`window` queries that attend to their own and the previous block only: O(T * 2 * window). A band
written as a mask on dense attention (what a naive implementation does) costs as much as dense.

    python benchmarks/attention.py [--window 256] [--heads 12] [--head-size 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gptlab.model import banded_causal_attention
from gptlab.reports.table import format_table


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    w = args.window
    rows = []
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, window {w}, "
        f"{args.heads} heads x {args.head_size}, batch 1, fp32, forward only"
    )
    with torch.inference_mode():
        for T in (int(t) for t in args.lengths.split(",")):
            q, k, v = torch.randn(3, 1, args.heads, T, args.head_size).unbind(0)
            i, j = torch.arange(T)[:, None], torch.arange(T)[None]
            band_mask = (j <= i) & (i - j < w)
            dense = median_seconds(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.repeats
            )
            masked = median_seconds(
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask), args.repeats
            )
            banded = median_seconds(lambda: banded_causal_attention(q, k, v, w), args.repeats)
            rows.append(
                {
                    "context": T,
                    "dense causal ms": round(dense * 1e3, 2),
                    "band as mask ms": round(masked * 1e3, 2),
                    "gptlab banded ms": round(banded * 1e3, 2),
                    "speed-up vs dense": round(dense / banded, 2),
                    "keys/query dense": round((T + 1) / 2, 1),
                    "keys/query banded": 2 * w,
                }
            )
    print(format_table(rows, markdown=True))


if __name__ == "__main__":
    main()
