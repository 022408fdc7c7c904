"""Does bf16 autocast cost quality? The main job's model trained 200 steps in fp32 and in bf16.

Both runs use the main job's recipe (`nano`, 8 x 256 tokens, lr 3e-3), the default corpus (the Python
standard library; tokenizer and shards are built under data/stdlib/ first if absent), the same seed,
hence the same initial weights and batches. Reported: the validation loss at the last step (the same
evenly spread validation batches for every run) and the mean training loss of the last 20 steps, with
the bf16 run's difference from fp32. Target: within 2%.

At 200 steps this model is still leaving its unigram plateau, and when it does depends on the seed:
fp32 runs with different seeds differ by several percent. So each seed is a pair (fp32, bf16) on
the same weights and batches, the table gives the mean paired difference over the seeds, and a
control pair per seed (fp32 on 1 thread against fp32 on all threads: only the order of float
additions differs) shows how far two runs drift apart from rounding alone.

    python benchmarks/bf16_loss.py                        # seeds 0 1 2, 200 steps each
    python benchmarks/bf16_loss.py --seeds 0 --steps 50   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptlab.train.config import ModelSection  # noqa: E402
from gptlab.train.pipeline import DATA_DIR, default_config, ensure_dataset, ensure_tokenizer  # noqa: E402
from gptlab.train.pretrain import pretrain  # noqa: E402


def run(dtype: str, steps: int, preset: str, out: Path, threads: int | None, seed: int) -> dict:
    cfg = default_config()
    cfg = dataclasses.replace(
        cfg,
        model=ModelSection(preset=preset),
        data=dataclasses.replace(cfg.data, seed=seed),
        train=dataclasses.replace(
            cfg.train,
            max_steps=steps,
            dtype=dtype,
            seed=seed,
            run_dir=str(out / f"{dtype}-{seed}-{threads}"),
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
        "val_loss": result.val_loss,
        "train_loss": statistics.mean(train_losses) if train_losses else result.loss,
        "seconds": time.perf_counter() - began,
    }


def percent(a: dict, b: dict, key: str) -> float:
    return 100 * (a[key] / b[key] - 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--preset", default="nano")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=None, help="threads of the fp32 and bf16 runs (default: all)")
    p.add_argument("--no-control", action="store_true", help="skip the fp32 1-thread control runs")
    args = p.parse_args(argv)

    tokenizer = ensure_tokenizer(DATA_DIR)
    ensure_dataset(DATA_DIR, tokenizer)
    control = not args.no_control and (args.threads or torch.get_num_threads()) > 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            runs = {d: run(d, args.steps, args.preset, Path(tmp), args.threads, seed) for d in ("float32", "bfloat16")}
            if control:
                runs["float32, 1 thread"] = run("float32", args.steps, args.preset, Path(tmp), 1, seed)
            for name, r in runs.items():
                rows.append(dict(seed=seed, dtype=name, **r))
                print(f"seed {seed} {name}: val {r['val_loss']:.4f} ({r['seconds']:.0f} s)", file=sys.stderr)

    print(f"\n{args.preset}, {args.steps} steps of 8 x 256 tokens on the standard library corpus\n")
    print("| seed | run | val loss | train loss (last 20 steps) | vs fp32 (val) | vs fp32 (train) | wall s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    diffs: dict[str, list[float]] = {}
    for r in rows:
        base = next(b for b in rows if b["seed"] == r["seed"] and b["dtype"] == "float32")
        dv, dt = percent(r, base, "val_loss"), percent(r, base, "train_loss")
        if r is not base:
            diffs.setdefault(r["dtype"], []).append(dv)
        print(
            f"| {r['seed']} | {r['dtype']} | {r['val_loss']:.4f} | {r['train_loss']:.4f} | {dv:+.2f}% | {dt:+.2f}% "
            f"| {r['seconds']:.0f} |"
        )
    fp32 = [r["val_loss"] for r in rows if r["dtype"] == "float32"]
    print()
    for name, d in diffs.items():
        spread = f", per seed {min(d):+.2f}% to {max(d):+.2f}%" if len(d) > 1 else ""
        print(f"{name} vs fp32, validation loss: mean {statistics.mean(d):+.2f}%{spread}")
    if len(fp32) > 1:
        sd = 100 * statistics.stdev(fp32) / statistics.mean(fp32)
        print(f"fp32 across seeds: {min(fp32):.4f} to {max(fp32):.4f} (sd {sd:.1f}% of the mean)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
