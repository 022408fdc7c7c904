"""PNG charts: sizing bars, one run's loss curve, several runs' curves overlaid.

Figures are built with `matplotlib.figure.Figure` (the Agg canvas, no pyplot), so nothing touches a
display or the process-wide backend, and written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Run = Any  # a `gptlab.reports.run_report.Run` (which imports this module to draw its plots)

# (key in `sizing()` results, bar label): the quantities worth a log-scale glance.
SIZING_BARS = (
    ("params", "parameters"),
    ("params_non_embedding", "non-embedding\nparameters"),
    ("fwd_flops_per_token", "forward FLOPs\nper token"),
    ("train_flops", "training FLOPs"),
    ("weights_bf16_bytes", "bf16 weights\n(bytes)"),
    ("train_memory_bytes", "training memory\n(bytes)"),
    ("kv_bytes_full_context", "KV cache, full\ncontext (bytes)"),
    ("chinchilla_tokens", "compute-optimal\ntokens"),
    ("train_days", "training days"),
    ("inference_tokens_per_s", "decode tokens/s\nbound"),
)


def _figure(**kwargs: Any) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig: Figure, path: str | Path) -> Path:
    from gptlab.checkpoint import atomic_write_bytes

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot file {path} must end in .png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_sizing(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Grouped log-scale bars: one group per quantity, one bar per model."""
    from gptlab.reports.table import human

    if not results:
        raise ValueError("nothing to plot: no models given")
    fig = _figure(figsize=(max(8.0, 1.2 * len(SIZING_BARS) * max(1, len(results)) ** 0.5), 5))
    ax = fig.add_subplot()
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(SIZING_BARS))]
        values = [r[k] for k, _ in SIZING_BARS]
        bars = ax.bar(xs, values, width=width, label=r.get("label", r["name"]))
        ax.bar_label(
            bars, [f"{v:.2g}".replace("e+", "e") for v in values], fontsize=6, rotation=90, padding=2
        )
    ax.set_yscale("log")
    top = max(r[k] for r in results for k, _ in SIZING_BARS)
    ax.set_ylim(top=top * 1e4)  # room for the value labels above the tallest bar
    ax.set_xticks(range(len(SIZING_BARS)), [label for _, label in SIZING_BARS], fontsize=8)
    first = results[0]
    ax.set_title(
        f"training on {human(first['train_tokens'])} tokens, {first['n_gpus']}x {first['gpu']} at "
        f"MFU {first['mfu']:g}; micro-batch {first['micro_batch']} at full context"
    )
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _loss_lines(ax: Axes, run: Run, x: str, label: str | None = None) -> None:
    """Train loss as a line and validation loss as markers against x ('step', 'tokens' or 'flops')."""
    train = [(run.x_value(m, x), m["loss"]) for m in run.metrics if m.get("loss") is not None]
    val = [(run.x_value(m, x), m["val_loss"]) for m in run.metrics if m.get("val_loss") is not None]
    train = [(a, b) for a, b in train if a is not None]
    val = [(a, b) for a, b in val if a is not None]
    prefix = f"{label} " if label else ""
    xy = zip(*train, strict=True) if train else ([], [])
    (line,) = ax.plot(*xy, label=f"{prefix}train", alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), "o--", color=line.get_color(), markersize=4, label=f"{prefix}val")


_AXIS_LABELS = {"step": "step", "tokens": "tokens seen", "flops": "training FLOPs (6ND + attention)"}


def plot_run(run: Run, path: str | Path) -> Path:
    """One run's train / validation loss against steps and tokens."""
    fig = _figure(figsize=(11, 4))
    for i, x in enumerate(("step", "tokens")):
        ax = fig.add_subplot(1, 2, i + 1)
        _loss_lines(ax, run, x)
        ax.set_xlabel(_AXIS_LABELS[x])
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{run.name}: {run.model.n_params():,} parameters, {run.model.attn_pattern} attention")
    return _save(fig, path)


def plot_runs(runs: Sequence[Run], path: str | Path) -> Path:
    """Several runs' loss curves overlaid: by step, by tokens and by training FLOPs."""
    if not runs:
        raise ValueError("nothing to plot: no runs given")
    fig = _figure(figsize=(16, 4.5))
    for i, x in enumerate(("step", "tokens", "flops")):
        ax = fig.add_subplot(1, 3, i + 1)
        for run in runs:
            _loss_lines(ax, run, x, run.name)
        ax.set_xlabel(_AXIS_LABELS[x])
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    return _save(fig, path)


def _suite_panels(
    rows: Sequence[dict[str, Any]], path: str | Path, x: str, series: str, xlabel: str, log_x: bool
) -> Path:
    """One panel per task: its metric (percent, standard-error bars) against `x`, a line per `series`."""
    if not rows:
        raise ValueError("nothing to plot: no results given")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    columns = min(3, len(tasks))
    fig = _figure(figsize=(4.2 * columns, 3.4 * -(-len(tasks) // columns)))
    axes = [fig.add_subplot(-(-len(tasks) // columns), columns, i + 1) for i in range(len(tasks))]
    for ax, task in zip(axes, tasks, strict=True):
        mine = [r for r in rows if r["task"] == task]
        for key in dict.fromkeys(r[series] for r in mine):
            points = sorted((r[x], 100 * r["value"], 100 * (r["stderr"] or 0)) for r in mine if r[series] == key)
            xs, ys, errs = zip(*points, strict=True)
            label = f"{key}-shot" if series == "shots" else Path(str(key)).name
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
        if log_x:
            ax.set_xscale("log")
        else:
            ax.set_xticks(sorted({r[x] for r in mine}))
        ax.set_title(f"{task} ({mine[0]['metric']})", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_suite_shots(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """`gptlab eval suite` results: each task's metric against the number of examples in the prompt, one
    line per checkpoint (the shape of the GPT-3 paper's figures 3.x)."""
    return _suite_panels(rows, path, "shots", "checkpoint", "examples in context (K)", log_x=False)


def plot_suite_sizes(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """`gptlab eval suite` results: each task's metric against parameters (log scale), one line per
    number of shots (zero, one, few: the GPT-3 paper's presentation)."""
    return _suite_panels(rows, path, "params", "shots", "parameters", log_x=True)


def eval_task_series(rows: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """{"eval/<task>": [(tokens, score), ...]} from metrics rows (what `train.eval_tasks` logs)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for key, value in r.items():
            if key.startswith("eval/") and value is not None and r.get("tokens") is not None:
                series.setdefault(key, []).append((r["tokens"], value))
    return series


def plot_eval_tasks(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """The `train.eval_tasks` scores against tokens seen (perplexities on a second, log axis); None when
    none were logged."""
    series = eval_task_series(rows)
    if not series:
        return None
    fig = _figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ppl_ax = None
    for key, points in series.items():
        if key.endswith("_ppl"):
            ppl_ax = ppl_ax or ax.twinx()
            ppl_ax.plot(*zip(*points, strict=True), "s--", markersize=3, label=key, color="grey")
        else:
            ax.plot(*zip(*points, strict=True), "o-", markersize=3, label=key.removeprefix("eval/"))
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("accuracy (the paper's metric)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if ppl_ax is not None:
        ppl_ax.set_yscale("log")
        ppl_ax.set_ylabel("perplexity")
        ppl_ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)
