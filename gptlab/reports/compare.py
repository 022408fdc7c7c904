"""`gptlab compare`: models side by side (presets, config files) or training runs side by side.

Models as columns, quantities as rows. Runs are detected by their directory layout; everything else
is read as a model (a preset name, or a TOML / YAML / JSON file with model fields).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gptlab.config import ModelConfig, load_config_file
from gptlab.reports.run_report import Run, final_metrics, is_run_dir, load_run, model_config_from_dict
from gptlab.reports.sizing import sizing
from gptlab.reports.table import RUN_ROWS, bytes_text, format_table, g_text, human, int_text, sci_text

FORMATS = ("table", "markdown", "json", "csv")


def load_model_spec(spec: str) -> ModelConfig:
    """A preset name, a run directory, a checkpoint directory or a config file -> ModelConfig."""
    from gptlab.presets import PRESETS

    if spec in PRESETS:
        from gptlab.presets import preset

        return preset(spec)
    path = Path(spec)
    if is_run_dir(path):
        return load_run(path).model
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.is_file():
        cfg = model_config_from_dict(load_config_file(path), str(path))
        return cfg
    raise ValueError(
        f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing config file, "
        "checkpoint or run directory"
    )


def _labels(specs: Sequence[str], names: Sequence[str]) -> list[str]:
    """Column labels: the preset / config name, else the file or directory name; made unique."""
    out: list[str] = []
    for spec, name in zip(specs, names, strict=True):
        label = name if name not in ("custom", "") else Path(spec).stem or spec
        if Path(spec).name == "config.json":
            label = Path(spec).parent.name
        while label in out:
            label += "'"
        out.append(label)
    return out


# (key in sizing(), row label, formatter)
SIZING_ROWS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("n_layer", "layers", str),
    ("d_model", "d_model", str),
    ("n_head", "heads", str),
    ("head_size", "head size", str),
    ("n_ctx", "context", str),
    ("attention", "attention", str),
    ("params", "parameters", int_text),
    ("params_embedding", "  embedding", int_text),
    ("params_non_embedding", "  non-embedding", int_text),
    ("fwd_flops_per_token", "forward FLOPs/token (full context)", sci_text),
    ("train_flops", "training FLOPs (6ND + attention)", sci_text),
    ("weights_fp32_bytes", "weights fp32", bytes_text),
    ("weights_bf16_bytes", "weights bf16", bytes_text),
    ("weights_int8_bytes", "weights int8", bytes_text),
    ("train_weights_bytes", "AdamW train: weights (fp32)", bytes_text),
    ("train_gradients_bytes", "  gradients (fp32)", bytes_text),
    ("train_optimizer_bytes", "  optimizer state (2x fp32)", bytes_text),
    ("activations_bytes", "  activations", bytes_text),
    ("activations_checkpointed_bytes", "  activations, checkpointed", bytes_text),
    ("train_memory_bytes", "  total", bytes_text),
    ("train_memory_checkpointed_bytes", "  total, checkpointed", bytes_text),
    ("kv_bytes_per_token", "KV cache bf16 / token", bytes_text),
    ("kv_bytes_full_context", "KV cache bf16, full context", bytes_text),
    ("chinchilla_tokens", "compute-optimal tokens (20/param)", human),
    ("train_days", "training days", g_text),
    ("inference_tokens_per_s", "decode tokens/s bound (batch 1)", g_text),
]



def render(
    records: Sequence[dict[str, Any]],
    labels: Sequence[str],
    rows: Sequence[tuple[str, str, Callable[[Any], str]]],
    fmt: str = "table",
    header: str = "",
) -> str:
    """Quantities as rows and models / runs as columns, in one of FORMATS."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; valid: {list(FORMATS)}")
    if fmt == "json":
        return json.dumps([{"label": lab, **r} for lab, r in zip(labels, records, strict=True)], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["quantity", *labels])
        for key, _, _ in rows:
            w.writerow([key, *("" if r.get(key) is None else r[key] for r in records)])
        return buf.getvalue().rstrip("\n")  # print() adds the final newline
    table = [
        {
            "quantity": title,
            **{
                lab: "n/a" if r.get(key) is None else f(r[key])
                for lab, r in zip(labels, records, strict=True)
            },
        }
        for key, title, f in rows
    ]
    text = format_table(table, ["quantity", *labels], markdown=fmt == "markdown")
    return f"{header}\n\n{text}" if header else text


def compare_models(
    specs: Sequence[str],
    tokens: float = 300e9,
    micro_batch: int = 1,
    gpu: str = "A100",
    n_gpus: int = 1,
    mfu: float = 0.4,
) -> tuple[list[str], list[dict[str, Any]]]:
    """(labels, sizing() result per model)."""
    configs = [load_model_spec(s) for s in specs]
    labels = _labels(specs, [c.name for c in configs])
    return labels, [sizing(c, tokens, micro_batch, gpu, n_gpus, mfu) for c in configs]


def compare_runs(run_dirs: Sequence[str | Path]) -> tuple[list[Run], list[dict[str, Any]]]:
    runs = [load_run(d) for d in run_dirs]
    return runs, [final_metrics(r) for r in runs]


def parse_tokens(value: str) -> float:
    """'300e9', '300B', '2.5T' -> tokens."""
    v = value.strip()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(v[-1:].upper())
    try:
        n = float(v[:-1]) * scale if scale else float(v)
    except ValueError:
        raise ValueError(f"token budget {value!r} is not a number; write e.g. 300e9 or 300B") from None
    if n <= 0:
        raise ValueError(f"token budget must be positive, got {value!r}")
    return n


def run_compare(
    specs: Sequence[str],
    fmt: str = "table",
    plot: str | Path | None = None,
    tokens: float = 300e9,
    micro_batch: int = 1,
    gpu: str = "A100",
    n_gpus: int = 1,
    mfu: float = 0.4,
) -> str:
    """What `gptlab compare` prints: a run comparison when every argument is a run directory (loss
    curves plotted by step, tokens and FLOPs), else a model sizing comparison."""
    from gptlab.reports import plots

    if not specs:
        raise ValueError("give at least one model (preset or config file) or run directory to compare")
    if all(is_run_dir(s) for s in specs):
        runs, records = compare_runs(specs)
        labels = _labels([str(r.path) for r in runs], [r.name for r in runs])
        if plot:
            plots.plot_runs(runs, plot)
        return render(records, labels, RUN_ROWS, fmt)
    labels, records = compare_models(specs, tokens, micro_batch, gpu, n_gpus, mfu)
    if plot:
        plots.plot_sizing([{"label": lab, **r} for lab, r in zip(labels, records, strict=True)], plot)
    r0 = records[0]
    header = (
        f"Training on {human(r0['train_tokens'])} tokens with AdamW (mixed precision) at micro-batch "
        f"{micro_batch}, full context; {n_gpus}x {r0['gpu']} at MFU {mfu:g}. Activations: Korthikanti et al. "
        "2022, s*b*h*(34 + 5*a*s/h) bytes per layer; checkpointed: 2*s*b*h per layer plus one layer."
    )
    return render(records, labels, SIZING_ROWS, fmt, header=header if fmt in ("table", "markdown") else "")
