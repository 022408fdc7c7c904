"""AdamW against Muon (`optim.name = "muon"`) on the main job's model and the standard-library corpus.

Both runs: the same model and initial weights (same seed), the same batches, the same number of steps,
hence the same tokens; each run's wall time is reported beside it. The validation loss (the same evenly
spread validation batches for both) is measured every `--eval-every` steps; the curves are overlaid in
a PNG, and the table gives the tokens Muon needs to reach AdamW's final validation loss (linear
interpolation between evaluations).

    python benchmarks/optimizers.py                 # 300 steps each
    python benchmarks/optimizers.py --steps 60      # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptlab.reports.run_report import cpu_name  # noqa: E402
from gptlab.train.pipeline import DATA_DIR, default_config, ensure_dataset, ensure_tokenizer  # noqa: E402
from gptlab.train.pretrain import pretrain  # noqa: E402


def run(name: str, steps: int, eval_every: int, out: Path) -> dict:
    cfg = default_config()
    cfg = dataclasses.replace(
        cfg,
        optim=dataclasses.replace(cfg.optim, name=name),
        train=dataclasses.replace(
            cfg.train,
            max_steps=steps,
            run_dir=str(out / name),
            eval_interval=eval_every,
            eval_batches=16,
            checkpoint_interval=steps,
            progress=False,
            time_limit=None,
        ),
    )
    began = time.perf_counter()
    result = pretrain(cfg)
    curve = [(r["tokens"], r["val_loss"]) for r in result.rows if r.get("val_loss") is not None]
    return {"name": name, "wall": time.perf_counter() - began, "curve": curve, "tokens": result.tokens}


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the curve first reaches `target` (linear between evaluations), None if never."""
    prev = (0, float("inf"))
    for tokens, loss in curve:
        if loss <= target:
            if prev[1] == float("inf"):
                return float(tokens)
            return prev[0] + (tokens - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (tokens, loss)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--png", default="benchmarks/optimizers.png")
    args = ap.parse_args()
    ensure_dataset(DATA_DIR, ensure_tokenizer(DATA_DIR))
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(name, args.steps, args.eval_every, Path(tmp)) for name in ("adamw", "muon")]
    adamw, muon = results
    target = adamw["curve"][-1][1]
    need = tokens_to_reach(muon["curve"], target)

    print(f"CPU: {cpu_name()}; nano preset, {args.steps} steps, {adamw['tokens']:,} tokens per run")
    print("| optimizer | final val loss | wall (s) | tokens to reach AdamW's final val loss |")
    print("|---|---|---|---|")
    for r in results:
        reach = adamw["tokens"] if r is adamw else need
        shown = f"{reach:,.0f}" if reach is not None else "not reached"
        print(f"| {r['name']} | {r['curve'][-1][1]:.3f} | {r['wall']:.0f} | {shown} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot([t for t, _ in r["curve"]], [v for _, v in r["curve"]], marker="o", label=r["name"])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("AdamW vs Muon, nano on the standard library")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
