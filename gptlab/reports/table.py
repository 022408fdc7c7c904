"""Plain-text and Markdown tables for terminal output."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, markdown: bool = False
) -> str:
    """Align `rows` (dicts) under `columns`; numbers right-aligned."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(_is_number(r.get(c)) for r in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    sep = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric))
        + "|"
        if markdown
        else "  ".join("-" * w for w in widths)
    )
    return "\n".join([line(columns), sep, *(line(r) for r in cells)])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---- number formats for report rows -------------------------------------------------------------
def bytes_text(n: float) -> str:
    for factor, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n:.0f} B"


def sci_text(x: float) -> str:
    return f"{x:.3g}".replace("e+", "e")


def int_text(x: float) -> str:
    return f"{int(x):,}"


def g_text(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


# (key in a run's final metrics, row label, formatter)
RUN_ROWS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("params", "parameters", int_text),
    ("attention", "attention", str),
    ("seq_len", "sequence length", str),
    ("steps", "steps", str),
    ("tokens", "tokens seen", human),
    ("train_flops", "training FLOPs", sci_text),
    ("final_train_loss", "final train loss", lambda v: f"{v:.4f}"),
    ("final_val_loss", "final val loss", lambda v: f"{v:.4f}"),
    ("best_val_loss", "best val loss", lambda v: f"{v:.4f}"),
    ("val_perplexity", "val perplexity", lambda v: f"{v:.2f}"),
    ("tokens_per_s", "tokens/s (median)", g_text),
    ("mfu", "MFU (median)", lambda v: f"{v:.3f}"),
    ("elapsed_s", "elapsed s", g_text),
]
