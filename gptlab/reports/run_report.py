"""Read a training run directory and write its Markdown report card.

A run directory (what `gptlab train` writes): config.json (the full train config, model included),
metrics.jsonl (one JSON object per logged step: step, loss, val_loss at eval steps, lr, tokens,
tokens_per_s, mfu, elapsed), checkpoints/step_XXXXXXXX/.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.config import ModelConfig, flatten, load_config_file

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
# Names a train config may give the sequence length, most specific first.
_SEQ_KEYS = ("seq_len", "block_size", "sequence_length", "context_length")


SAMPLE_PROMPT = "def "
"""The sample's default prompt: the default corpus is Python, so a function's start shows what it learned."""

def is_run_dir(path: str | Path) -> bool:
    """A training run: a directory with metrics.jsonl or a checkpoints/ folder next to its config."""
    p = Path(path)
    return p.is_dir() and ((p / METRICS_FILE).is_file() or (p / "checkpoints").is_dir())


def model_config_from_dict(d: dict[str, Any], where: str = "config") -> ModelConfig:
    """A `ModelConfig` from a train config ({'model': {...}}), a gptlab checkpoint config, bare model
    fields, or a Hugging Face GPT-2 config.json; a 'preset' key names a preset the rest overrides."""
    from gptlab.config import apply_overrides, from_dict
    from gptlab.presets import preset

    if isinstance(d.get("model"), str):  # {"model": "gpt2"}
        return preset(d["model"])
    if isinstance(d.get("model"), dict):
        d = d["model"]
    if "n_positions" in d and "n_embd" in d:  # Hugging Face GPT2Config
        return ModelConfig(
            name=str(d.get("_name_or_path") or "hf-gpt2"),
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            n_embd=d["n_embd"],
            n_ctx=d["n_positions"],
            vocab_size=d["vocab_size"],
            n_inner=d.get("n_inner"),
            layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
        )
    # A train config's model section: None means "the preset's value".
    d = {k: v for k, v in d.items() if v is not None}
    base = d.pop("preset", None)
    try:
        if base:
            return apply_overrides(preset(base), d)
        return from_dict(ModelConfig, d, "model")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} does not describe a model: {e}") from None


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    model: ModelConfig
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def seq_len(self) -> int:
        flat = flatten(self.config)
        for key in _SEQ_KEYS:
            for k, v in flat.items():
                if k.rsplit(".", 1)[-1] == key and isinstance(v, int) and v > 0:
                    return v
        return self.model.n_ctx

    @property
    def train_flops_per_token(self) -> float:
        return self.model.flops_per_token(min(self.seq_len, self.model.n_ctx), backward=True)

    def x_value(self, m: dict[str, Any], x: str) -> float | None:
        if x == "step":
            return m.get("step")
        tokens = m.get("tokens")
        if tokens is None:
            return None
        return tokens if x == "tokens" else tokens * self.train_flops_per_token


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of dicts. A partial last line (a run still writing) is skipped; a bad
    line elsewhere is an error naming it."""
    path = Path(path)
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1} is not valid JSON ({e}); fix or delete that line") from None
        if isinstance(row, dict):
            out.append(row)
    return out


def load_run(path: str | Path) -> Run:
    """Load a run directory's config and metrics; the model config comes from config.json, else the
    newest checkpoint."""
    from gptlab.checkpoint import list_checkpoints

    path = Path(path)
    if not is_run_dir(path):
        raise FileNotFoundError(
            f"{path} is not a run directory (expected {METRICS_FILE} or checkpoints/ inside it); "
            "pass the folder `gptlab train` wrote, e.g. runs/<name>"
        )
    config: dict[str, Any] = {}
    if (path / CONFIG_FILE).is_file():
        config = load_config_file(path / CONFIG_FILE)
    model = None
    if "model" in config:
        model = model_config_from_dict(config, str(path / CONFIG_FILE))
    else:
        ckpts = list_checkpoints(path)
        if ckpts:
            model = model_config_from_dict(load_config_file(ckpts[-1] / CONFIG_FILE), str(ckpts[-1]))
    if model is None:
        raise FileNotFoundError(
            f"{path} has no model config: neither {CONFIG_FILE} nor a checkpoint names one"
        )
    metrics = read_metrics(path / METRICS_FILE) if (path / METRICS_FILE).is_file() else []
    return Run(path=path, config=config, model=model, metrics=metrics)


def final_metrics(run: Run) -> dict[str, Any]:
    """The numbers a run ends with; None where the run did not log them."""
    m = run.metrics
    train = [r for r in m if r.get("loss") is not None]
    val = [r for r in m if r.get("val_loss") is not None]
    last = m[-1] if m else {}
    tokens = max((r["tokens"] for r in m if r.get("tokens") is not None), default=None)
    # Throughput and MFU: the median over logged steps, robust to the slow first (compile, warm-up) step.
    tps = [r["tokens_per_s"] for r in m[1:] or m if r.get("tokens_per_s")]
    mfu = [r["mfu"] for r in m[1:] or m if r.get("mfu") is not None]
    val_loss = val[-1]["val_loss"] if val else None
    return {
        "run": run.name,
        "params": run.model.n_params(),
        "attention": "dense"
        if run.model.attn_pattern == "dense"
        else f"dense/local({run.model.local_window})",
        "seq_len": run.seq_len,
        "steps": last.get("step"),
        "tokens": tokens,
        "train_flops": tokens * run.train_flops_per_token if tokens is not None else None,
        "final_train_loss": train[-1]["loss"] if train else None,
        "final_val_loss": val_loss,
        "best_val_loss": min(r["val_loss"] for r in val) if val else None,
        "val_perplexity": math.exp(val_loss) if val_loss is not None else None,
        "tokens_per_s": statistics.median(tps) if tps else None,
        "mfu": statistics.median(mfu) if mfu else None,
        "elapsed_s": last.get("elapsed", last.get("time")),
    }


# ---- the report card ----------------------------------------------------------------------------
def resolve_run_path(run_dir: Path, value: str) -> list[Path]:
    """Where a path in a run's config may be: as written when absolute; a relative one was relative to
    the directory training ran in, which is not the working directory now, so the run's own
    surroundings come first (runs live in `<project>/runs/<name>`), the working directory last."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return [p]
    run_dir = run_dir.resolve()
    return [run_dir.parent.parent / p, run_dir.parent / p, run_dir / p, Path.cwd() / p]


def _data_manifest(run: Run) -> tuple[Path, dict[str, Any]] | None:
    """The prepared data's manifest.json: in the run dir, or in a data directory the config names."""
    candidates = [run.path / "data_manifest.json", run.path / "manifest.json"]
    for key, value in flatten(run.config).items():
        if isinstance(value, str) and key.split(".")[0] in ("data", "train") and value:
            for p in resolve_run_path(run.path, value):
                candidates += [p / "manifest.json", p.parent / "manifest.json"]
    for c in candidates:
        if c.is_file():
            try:
                return c, json.loads(c.read_text())
            except json.JSONDecodeError:
                continue
    return None


def _scalars(d: dict[str, Any], limit: int = 20) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in flatten(d).items() if not isinstance(v, list)][:limit]


def generate_sample(run_dir: str | Path, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 48) -> str:
    """A short greedy continuation of `prompt` from the run's newest checkpoint (without the prompt)."""
    import torch

    from gptlab.checkpoint import list_checkpoints, load_model, load_tokenizer

    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint under checkpoints/step_*")
    # The newest checkpoint by name: the run dir's own config.json is the train config, not a model's.
    model = load_model(ckpts[-1])
    tok = load_tokenizer(ckpts[-1])
    try:
        from gptlab.infer.generate import generate
    except ImportError:
        generate = None
    if generate is not None:
        return generate(model, tok, prompt, temperature=0.0, max_new_tokens=max_new_tokens)[0].text
    ids = tok.encode(prompt)[-(model.config.n_ctx - 1) :] or [tok.eot_id]
    idx = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        for _ in range(max_new_tokens):  # greedy, recomputing the window: a few dozen tokens, tiny cost
            logits, _ = model(idx[:, -model.config.n_ctx :], last_only=True)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            if int(nxt) == tok.eot_id:
                break
            idx = torch.cat([idx, nxt], dim=1)
    return tok.decode(idx[0, len(ids) :].tolist())


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:.3g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def cpu_name() -> str:
    """The CPU's model name (benchmark tables name the machine they were measured on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    import torch

    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "report device": device,
    }


def _eval_task_section(run: Run, out: Path) -> list[str]:
    """The `train.eval_tasks` scores: first, last and best of each, and their curves."""
    from gptlab.reports.plots import eval_task_series, plot_eval_tasks

    series = eval_task_series(run.metrics)
    if not series:
        return []
    lines = ["## GPT-3 paper tasks during training (`train.eval_tasks`)", "",
             "| score | first | last | best |", "|---|---:|---:|---:|"]  # fmt: skip
    for key, points in series.items():
        values = [v for _, v in points]
        best = min(values) if key.endswith("_ppl") else max(values)
        lines.append(f"| {key} | {values[0]:.4g} | {values[-1]:.4g} | {best:.4g} |")
    png = plot_eval_tasks(run.metrics, out.with_name(out.stem + "_eval_tasks.png"))
    return [*lines, "", f"![eval tasks]({png.name})", ""]  # type: ignore[union-attr]


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    sample: bool = True,
    prompt: str = SAMPLE_PROMPT,
    max_new_tokens: int = 48,
) -> Path:
    """Write RUN_DIR/report.md (or `out`) and the loss curve PNG beside it; returns the report path."""
    from gptlab.checkpoint import atomic_write_text, list_checkpoints
    from gptlab.reports.plots import plot_run
    from gptlab.reports.table import RUN_ROWS, format_table

    run = load_run(run_dir)
    out = Path(out) if out is not None else run.path / "report.md"
    if out.suffix.lower() != ".md":
        raise ValueError(f"report file {out} must end in .md")
    fin = final_metrics(run)
    lines = [f"# Run report: {run.name}", "", f"Run directory: `{run.path}`", ""]

    lines += ["## Final metrics", ""]

    rows = [{"metric": title, "value": "n/a" if fin[k] is None else f(fin[k])} for k, title, f in RUN_ROWS]
    lines += [format_table(rows, markdown=True), ""]
    if fin["val_perplexity"] is not None:
        lines += ["Perplexity = exp(final validation loss), loss in nats per token.", ""]

    if run.metrics:
        png = plot_run(run, out.with_name(out.stem + "_loss.png"))
        lines += ["## Loss curve", "", f"![loss curve]({png.name})", ""]
    else:
        lines += ["## Loss curve", "", f"No {METRICS_FILE} yet: nothing logged.", ""]

    lines += _eval_task_section(run, out)

    lines += ["## Model", ""]
    m = run.model
    lines += [
        f"{m.name}: {m.n_layer} layers, d_model {m.n_embd}, {m.n_head} heads of {m.head_size}, context "
        f"{m.n_ctx}, vocabulary {m.vocab_size}, {m.attn_pattern} attention"
        + (f" (band {m.local_window})" if m.attn_pattern != "dense" else "")
        + f"; {m.n_params():,} parameters ({m.n_params(embeddings=False):,} non-embedding), "
        f"{m.flops_per_token(run.seq_len) / 1e6:,.2f} MFLOPs per token forward at sequence length "
        f"{run.seq_len}.",
        "",
    ]

    lines += ["## Configuration", ""]
    if run.config:
        lines += ["```json", json.dumps(run.config, indent=2, default=str), "```", ""]
    else:
        lines += [f"No {CONFIG_FILE} in the run directory.", ""]

    lines += ["## Data", ""]
    manifest = _data_manifest(run)
    if manifest:
        path, data = manifest
        lines += [f"Manifest: `{path}`", ""]
        try:  # the manifest `gptlab prepare` writes has its own summary
            from gptlab.data.prepare import summary

            lines += ["```text", summary(data, path.parent), "```", ""]
        except (ImportError, KeyError, TypeError):
            rows = [{"field": k, "value": _fmt(v)} for k, v in _scalars(data)]
            lines += [format_table(rows, markdown=True), ""]
    else:
        lines += [
            "No data manifest found (looked in the run directory and the data paths of the config).",
            "",
        ]

    lines += ["## Sample", ""]
    ckpts = list_checkpoints(run.path)
    if not sample:
        lines += ["Sampling skipped (--no-sample).", ""]
    elif not ckpts:
        lines += ["No checkpoint yet: no sample.", ""]
    else:
        try:
            text = generate_sample(run.path, prompt, max_new_tokens)
            lines += [
                f"Greedy, {max_new_tokens} tokens from `{ckpts[-1].name}`, prompt {prompt!r}:",
                "",
                "```text",
                (prompt + text).strip("\n"),
                "```",
                "",
            ]
        except FileNotFoundError as e:  # no tokenizer saved with the run: say so in the report
            lines += [f"No sample: {e}", ""]

    lines += ["## Environment", ""]
    env = environment()
    trained_on = run.config.get("device") or flatten(run.config).get("train.device")
    if trained_on:
        env["training device (config)"] = str(trained_on)
    lines += [format_table([{"": k, "value": v} for k, v in env.items()], markdown=True), ""]

    atomic_write_text(out, "\n".join(lines))
    return out
