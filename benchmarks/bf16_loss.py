"""Does bf16 autocast cost quality? The main job's model trained 200 steps in fp32 and in bf16.

Both runs use the main job's recipe (`nano`, 8 x 256 tokens, lr 3e-3), the default corpus (the Python
standard library; tokenizer and shards are built under data/stdlib/ first if absent), the same seed,
hence the same initial weights and batches. Reported: the validation loss at the last step (the same
evenly spread validation batches for both) and the mean training loss of the last 20 steps, with the
bf16 run's difference from fp32. Target: within 2%.

    python benchmarks/bf16_loss.py                  # 200 steps each
    python benchmarks/bf16_loss.py --steps 50 --preset nano
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptlab.train.config import ModelSection  # noqa: E402
from gptlab.train.pipeline import DATA_DIR, default_config, ensure_dataset, ensure_tokenizer  # noqa: E402
from gptlab.train.pretrain import pretrain  # noqa: E402


def run(dtype: str, steps: int, preset: str, out: Path, threads: int | None) -> dict:
    cfg = default_config()
    cfg = dataclasses.replace(
        cfg,
        model=ModelSection(preset=preset),
        train=dataclasses.replace(
            cfg.train,
            max_steps=steps,
            dtype=dtype,
            run_dir=str(out / dtype),
            eval_interval=steps,
            eval_batches=16,
            checkpoint_interval=steps,
            progress=False,
            threads=threads,
        ),
    )
    began = time.perf_counter()
    result = pretrain(cfg)
    train_losses = [r["loss"] for r in result.rows if "loss" in r and r.get("step", 0) > steps - 20]
    return {
        "dtype": dtype,
        "val_loss": result.val_loss,
        "train_loss": statistics.mean(train_losses) if train_losses else result.loss,
        "seconds": time.perf_counter() - began,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--preset", default="nano")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    tokenizer = ensure_tokenizer(DATA_DIR)
    ensure_dataset(DATA_DIR, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(dtype, args.steps, args.preset, Path(tmp), args.threads) for dtype in ("float32", "bfloat16")]
    base = rows[0]
    print(f"\n{args.preset}, {args.steps} steps of 8 x 256 tokens on the standard library corpus\n")
    print("| dtype | val loss | train loss (last 20 steps) | vs fp32 (val) | vs fp32 (train) | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        dv = 100 * (r["val_loss"] / base["val_loss"] - 1)
        dt = 100 * (r["train_loss"] / base["train_loss"] - 1)
        print(
            f"| {r['dtype']} | {r['val_loss']:.4f} | {r['train_loss']:.4f} | {dv:+.2f}% | {dt:+.2f}% "
            f"| {r['seconds']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
