"""`gptlab eval suite CKPT... --tasks ... --shots 0,1,5`: every checkpoint on every task at every number
of shots; writes results.json, results.md, accuracy_vs_shots.png and (two checkpoints or more)
accuracy_vs_size.png into the output directory."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptlab.eval.suite import build, score
from gptlab.eval.suite_data import load_split
from gptlab.eval.suite_tasks import parse_tasks, task_spec


def parse_shots(text: str | Sequence[int]) -> list[int]:
    """'0,1,5' -> [0, 1, 5]."""
    try:
        shots = [int(s) for s in text.split(",") if s.strip()] if isinstance(text, str) else [int(s) for s in text]
    except ValueError:
        raise ValueError(f"--shots takes comma-separated counts such as 0,1,5; got {text!r}") from None
    if not shots or any(s < 0 for s in shots):
        raise ValueError(f"--shots needs counts >= 0, got {text!r}")
    return sorted(set(shots))


def run_suite(
    checkpoints: Sequence[str | Path],
    tasks: str | Sequence[str] = "all",
    shots: str | Sequence[int] = (0, 1, 5),
    data: str | Path | None = None,
    out: str | Path = "suite",
    style: str = "paper",
    seed: int = 1234,
    limit: int | None = None,
    tokenizer: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate, write the results table, JSON and plots under `out`; returns what results.json holds."""
    from gptlab.checkpoint import atomic_write_text, is_hub_name, load_model, load_tokenizer

    if not checkpoints:
        raise ValueError("give at least one checkpoint")
    names, counts = parse_tasks(list(tasks) if not isinstance(tasks, str) else tasks), parse_shots(shots)
    splits = {}
    for name in names:  # read (and check) every task's data before the first model loads
        splits[name] = (load_split(name, "test", data), load_split(name, "train", data) if max(counts) else [])
    rows, began = [], time.perf_counter()
    for checkpoint in checkpoints:
        local = checkpoint
        if isinstance(checkpoint, str) and is_hub_name(checkpoint):  # one snapshot: weights and tokenizer
            from gptlab.interop.hf import download

            local = download(checkpoint)
        model = load_model(local, device=device)
        tok = load_tokenizer(tokenizer or local)
        params = model.config.n_params()
        for name in names:
            for k in counts:
                prompted = build(task_spec(name), *splits[name], k, style, seed, limit)
                r = score(model, tok, prompted, batch_size=batch_size, progress=progress)
                rows.append({"checkpoint": str(checkpoint), "params": params, **{k: v for k, v in r.items()
                             if k != "items"}, "items": r["items"]})  # fmt: skip
                if progress:
                    print(_line(rows[-1]), flush=True)
    result = {"tasks": names, "shots": counts, "style": style, "seed": seed, "limit": limit,
              "seconds": round(time.perf_counter() - began, 1), "results": rows}  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "results.md", markdown_table(rows, counts) + "\n")
    from gptlab.reports.plots import plot_suite_shots, plot_suite_sizes

    result["files"] = [str(out / "results.json"), str(out / "results.md")]
    result["files"].append(str(plot_suite_shots(rows, out / "accuracy_vs_shots.png")))
    if len({r["checkpoint"] for r in rows}) > 1:
        result["files"].append(str(plot_suite_sizes(rows, out / "accuracy_vs_size.png")))
    return result


def _line(row: dict[str, Any]) -> str:
    stderr = f" ± {100 * row['stderr']:.1f}" if row["stderr"] is not None else ""
    return (f"{Path(row['checkpoint']).name}  {row['task']} {row['shots']}-shot (n={row['n']}): "
            f"{row['metric']} {100 * row['value']:.1f}{stderr}")  # fmt: skip


def markdown_table(rows: Sequence[dict[str, Any]], shots: Sequence[int]) -> str:
    """One line per (checkpoint, task): the paper's metric in percent ± its standard error per number of
    shots; LAMBADA's perplexity on a line of its own."""
    head = "| model | parameters | task | metric | n | " + " | ".join(f"{k}-shot" for k in shots) + " |"
    lines = [head, "|---|---:|---|---|---:|" + "---:|" * len(shots)]
    keys = list(dict.fromkeys((r["checkpoint"], r["task"]) for r in rows))
    for checkpoint, task in keys:
        by_shots = {r["shots"]: r for r in rows if (r["checkpoint"], r["task"]) == (checkpoint, task)}
        first = next(iter(by_shots.values()))

        def cell(r: dict[str, Any] | None) -> str:
            if r is None:
                return ""
            return f"{100 * r['value']:.1f}" + (f" ± {100 * r['stderr']:.1f}" if r["stderr"] is not None else "")

        prefix = f"| {Path(checkpoint).name} | {first['params'] / 1e6:.1f}M | {task} |"
        cells = " | ".join(cell(by_shots.get(k)) for k in shots)
        lines.append(f"{prefix} {first['metric']} | {first['n']} | {cells} |")
        if "ppl" in first["metrics"]:
            ppl = [f"{by_shots[k]['metrics']['ppl']:.2f}" if k in by_shots else "" for k in shots]
            lines.append(f"{prefix} ppl | {first['n']} | " + " | ".join(ppl) + " |")
    return "\n".join(lines)
