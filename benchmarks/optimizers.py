"""AdamW against Muon (`optim.name = "muon"`) on the main job's model and the standard-library corpus,
at equal tokens and at equal wall time.

Every run: the same model and initial weights (same seed), the same batches in the same order, the
validation loss on the same evenly spread validation batches every `--eval-every` steps (hence at the
same token intervals). Time is training time: each run's wall clock less its evaluations and
checkpoints, recovered from the loop's logged rows (`tokens_per_s` is measured with them left out), so
that the optimizer that evaluates more often in a given time is not charged for it.

1. Equal tokens: `--steps` steps each. The table gives each run's final validation loss, its time per
   step and the tokens Muon needs to reach AdamW's final validation loss (linear between evaluations).
2. Equal wall time: each optimizer trains for `--wall-seconds` (default: AdamW's steps in 1 at its
   median step time). The step count is set from the median step time measured in 1, so each run's
   cosine schedule ends where its time does (as `gptlab train` sizes its run); `train.time_limit`
   (minutes, fractions allowed) is set to twice the budget as a guard only, since it counts
   evaluations and would stop a run mid-schedule. A run whose step count equals its run in 1 is not
   trained again. The table gives the seconds each needs to reach AdamW's final validation loss.

The PNG has two panels: validation loss against tokens (1) and against training seconds (2). The time
one optimizer step takes alone (random gradients, no forward or backward) is measured too, to show
where Muon's extra time per step goes.

    python benchmarks/optimizers.py                                 # 200 steps; AdamW's time for 2
    python benchmarks/optimizers.py --wall-seconds 60               # a longer budget for 2
    python benchmarks/optimizers.py --steps 60 --wall-seconds 20    # a quick look
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

import torch  # noqa: E402

from gptlab.reports.run_report import cpu_name  # noqa: E402
from gptlab.train.optim import build_optimizer  # noqa: E402
from gptlab.train.pipeline import DATA_DIR, default_config, ensure_dataset, ensure_tokenizer  # noqa: E402
from gptlab.train.pretrain import build_model, pretrain, resolve  # noqa: E402

OPTIMIZERS = ("adamw", "muon")


def config(name: str, steps: int, eval_every: int, run_dir: Path, time_limit: float | None = None):
    cfg = default_config()
    return dataclasses.replace(
        cfg,
        optim=dataclasses.replace(cfg.optim, name=name),
        train=dataclasses.replace(
            cfg.train,
            max_steps=steps,
            run_dir=str(run_dir),
            eval_interval=eval_every,
            eval_batches=16,
            checkpoint_interval=steps,
            progress=False,
            time_limit=time_limit,
        ),
    )


def training_seconds(rows: list[dict]) -> list[float]:
    """Cumulative training seconds at each logged row: the tokens since the previous row over that
    interval's `tokens_per_s`, which the loop measures with evaluations and checkpoints paused."""
    total, tokens, out = 0.0, 0, []
    for r in rows:
        total += (r["tokens"] - tokens) / r["tokens_per_s"]
        tokens = r["tokens"]
        out.append(total)
    return out


def run(name: str, steps: int, eval_every: int, run_dir: Path, time_limit: float | None = None) -> dict:
    """One training run: its validation curve as (tokens, training seconds, loss) and its step time."""
    began = time.perf_counter()
    result = pretrain(config(name, steps, eval_every, run_dir, time_limit))
    seconds = training_seconds(result.rows)
    curve = [(r["tokens"], s, r["val_loss"]) for r, s in zip(result.rows, seconds) if r.get("val_loss") is not None]
    # Median over logged intervals: a burst of load from another job on the machine moves it little.
    per_step, last = [], (0, 0.0)
    for r, s in zip(result.rows, seconds):
        if r["step"] > last[0]:
            per_step.append((s - last[1]) / (r["step"] - last[0]))
        last = (r["step"], s)
    return {
        "name": name,
        "steps": result.step,
        "tokens": result.tokens,
        "curve": curve,
        "seconds": seconds[-1],
        "wall": time.perf_counter() - began,
        "step_s": statistics.median(per_step),
        "stop": result.stop_reason,
    }


def to_reach(curve: list[tuple[int, float, float]], target: float, axis: int = 0) -> float | None:
    """Tokens (axis 0) or training seconds (axis 1) at which the curve first reaches `target`, linear
    between evaluations; None if never."""
    prev = (0.0, float("inf"))
    for point in curve:
        x, loss = point[axis], point[2]
        if loss <= target:
            if prev[1] == float("inf"):
                return float(x)
            return prev[0] + (x - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (x, loss)
    return None


def shown(value: float | None, digits: int = 0) -> str:
    return f"{value:,.{digits}f}" if value is not None else "not reached"


def optimizer_step_ms(name: str, repeats: int = 30) -> float:
    """Median milliseconds of one `optimizer.step()` on the nano model with random gradients."""
    cfg = resolve(config(name, 1, 1, Path("unused")))
    model = build_model(cfg.model.resolve(), cfg.train.seed)
    params = list(model.named_parameters())
    optimizer = build_optimizer(model, params, cfg.optim, torch.device("cpu"))
    times = []
    for k in range(repeats + 5):
        for _, p in params:
            p.grad = torch.randn_like(p) * 1e-3
        began = time.perf_counter()
        optimizer.step()
        if k >= 5:  # the first steps allocate state and pick kernels
            times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def plot(token_runs: list[dict], wall_runs: list[dict], budget: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = {"adamw": "tab:blue", "muon": "tab:orange"}
    panels = [(token_runs, 0, "training tokens", "equal tokens"), (wall_runs, 1, "training seconds", "equal wall time")]
    for ax, (runs, axis, xlabel, title) in zip(axes, panels):
        for r in runs:
            ax.plot(
                [p[axis] for p in r["curve"]],
                [p[2] for p in r["curve"]],
                marker="o",
                color=colors[r["name"]],
                label=f"{r['name']} ({r['steps']} steps)",
            )
        ax.set_xlabel(xlabel)
        ax.set_title(title)
    axes[1].axvline(budget, color="grey", linestyle=":", label=f"budget {budget:.0f} s")
    axes[0].set_ylabel("validation loss")
    for ax in axes:
        ax.legend()
    fig.suptitle("AdamW vs Muon, nano on the standard library (evaluations excluded from the seconds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="steps of each equal-token run")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between validations")
    ap.add_argument(
        "--wall-seconds",
        type=float,
        default=None,
        help="training seconds of each equal-wall-time run (default: AdamW's steps at its median step time)",
    )
    ap.add_argument("--png", default="benchmarks/optimizers.png")
    args = ap.parse_args()
    if args.steps < 1 or args.eval_every < 1:
        ap.error(f"--steps and --eval-every must be positive, got {args.steps} and {args.eval_every}")
    if args.wall_seconds is not None and not args.wall_seconds > 0:
        ap.error(f"--wall-seconds must be a positive number of seconds, got {args.wall_seconds}")
    ensure_dataset(DATA_DIR, ensure_tokenizer(DATA_DIR))
    with tempfile.TemporaryDirectory() as tmp:
        token_runs = [run(name, args.steps, args.eval_every, Path(tmp) / f"{name}-tokens") for name in OPTIMIZERS]
        budget = args.wall_seconds or token_runs[0]["steps"] * token_runs[0]["step_s"]
        wall_runs = []
        for r in token_runs:
            steps = max(1, round(budget / r["step_s"]))
            if steps == r["steps"]:
                wall_runs.append(r)
            else:
                print(f"{r['name']}: {steps} steps of {r['step_s']:.3f} s fill {budget:.0f} s", flush=True)
                limit = 2 * budget / 60
                wall_runs.append(run(r["name"], steps, args.eval_every, Path(tmp) / f"{r['name']}-wall", limit))
    step_ms = {name: optimizer_step_ms(name) for name in OPTIMIZERS}

    adamw = token_runs[0]
    target = adamw["curve"][-1][2]
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; nano preset; {time.strftime('%Y-%m-%d')}")
    print(f"\nEqual tokens: {args.steps} steps, {adamw['tokens']:,} tokens each")
    print(
        "| optimizer | final val loss | training s | wall s, evaluations included | median s per step "
        "| optimizer step alone (ms) | tokens to reach AdamW's final val loss |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in token_runs:
        print(
            f"| {r['name']} | {r['curve'][-1][2]:.3f} | {r['seconds']:.0f} | {r['wall']:.0f} | {r['step_s']:.3f} "
            f"| {step_ms[r['name']]:.1f} | {shown(to_reach(r['curve'], target))} |"
        )
    print(f"\nEqual wall time: {budget:.0f} training seconds each")
    target = wall_runs[0]["curve"][-1][2]
    print("| optimizer | steps | tokens | training s | final val loss | training s to reach AdamW's final val loss |")
    print("|---|---|---|---|---|---|")
    for r in wall_runs:
        stop = "" if r["stop"] == "max_steps" else f" (stopped by {r['stop']})"
        print(
            f"| {r['name']} | {r['steps']} | {r['tokens']:,} | {r['seconds']:.0f}{stop} | {r['curve'][-1][2]:.3f} "
            f"| {shown(to_reach(r['curve'], target, axis=1), 1)} |"
        )
    plot(token_runs, wall_runs, budget, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
