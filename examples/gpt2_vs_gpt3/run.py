"""GPT-2 vs GPT-3 recipes at equal model size, equal data and equal compute.

    python examples/gpt2_vs_gpt3/run.py                      # CPU, a few minutes per run
    python examples/gpt2_vs_gpt3/run.py --tokens 50e6 --device cuda --vocab-size 8192 --set model.n_embd=256

Steps: train a byte-level BPE on the corpus (default: the Python standard library), `gptlab prepare`
it once, `gptlab train` gpt2.toml and gpt3.toml on it for the same number of tokens, then
`gptlab compare` the two runs (loss curves by step, tokens and FLOPs + a table of final metrics) and the
two model shapes (sizing), and `gptlab report` each run. Everything lands in --out.

The configs hold the recipes; this script only sets what depends on the token budget, in the papers'
proportions: the step counts (GPT-3's batch ramp makes its early steps smaller, so it gets the extra
steps that equalise tokens), GPT-3's decay horizon (260 of 300B tokens) and batch ramp (the upper end,
12 of 300B tokens), and the warm-ups.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = ("gpt2", "gpt3")


def tokens_per_full_step(cfg) -> int:
    return cfg.train.batch_size * cfg.data.seq_len


def steps_for_tokens(cfg, budget: int) -> tuple[int, list[int]]:
    """Steps until `budget` tokens are seen, following the trainer's own batch-size schedule, and the
    cumulative token count after each step."""
    from gptlab.train.schedule import batch_size_at

    t = cfg.train
    seen, cumulative = 0, []
    while seen < budget:
        seen += batch_size_at(seen, t.batch_size, t.batch_ramp_start, t.batch_ramp_tokens) * cfg.data.seq_len
        cumulative.append(seen)
    return len(cumulative), cumulative


def budget_overrides(name: str, budget: int) -> dict[str, str]:
    """The settings that scale with the token budget, per recipe."""
    from gptlab.train.config import load_train_config

    cfg = load_train_config(HERE / f"{name}.toml")
    if name == "gpt2":
        steps = math.ceil(budget / tokens_per_full_step(cfg))
        # GPT-1: linear warm-up (2000 updates) then cosine annealing to 0 at the end of training.
        return {"train.max_steps": str(steps), "optim.warmup_steps": str(max(1, round(0.05 * steps)))}
    ramp = max(12 * budget // 300, 1)  # GPT-3: over the first 4-12B of 300B tokens; the upper end
    cfg = load_train_config(HERE / f"{name}.toml", {"train.batch_ramp_tokens": str(ramp)})
    steps, cumulative = steps_for_tokens(cfg, budget)
    decay = next(i + 1 for i, c in enumerate(cumulative) if c >= budget * 260 / 300)  # 260B of 300B
    warmup = max(10, math.ceil(steps * 375e6 / 300e9))  # 375M of 300B tokens; 10 steps at least
    return {
        "train.max_steps": str(steps),
        "train.batch_ramp_tokens": str(ramp),
        "optim.decay_steps": str(decay),
        "optim.warmup_steps": str(warmup),
    }


def gptlab(*args: str, stdout: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "gptlab", *map(str, args)]
    print("$", " ".join(cmd[1:]), f"> {stdout}" if stdout else "", flush=True)
    if stdout is None:
        subprocess.run(cmd, check=True)
    else:
        with open(stdout, "w") as f:
            subprocess.run(cmd, check=True, stdout=f)


def prepare_data(out: Path, inputs: Sequence[str], vocab_size: int) -> tuple[Path, Path]:
    """A BPE trained on the corpus and the corpus tokenized with it (each made once, then reused)."""
    from gptlab.data.documents import default_corpus_files, resolve_inputs
    from gptlab.tokenizer import Tokenizer

    tok_dir, data_dir = out / "tokenizer", out / "data"
    if not (tok_dir / "vocab.json").is_file():
        files = resolve_inputs(inputs) if inputs else default_corpus_files()
        print(f"training a {vocab_size}-id BPE on {len(files)} files", flush=True)
        Tokenizer.train(files, vocab_size).save(tok_dir)
    if not (data_dir / "manifest.json").is_file():
        gptlab("prepare", *inputs, "--tokenizer", tok_dir, "--out", data_dir, "--val-fraction", "0.02")
    return tok_dir, data_dir


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="*", help="corpus files / directories (default: the stdlib)")
    p.add_argument("--out", default="runs/gpt2_vs_gpt3", help="output directory (default runs/gpt2_vs_gpt3)")
    p.add_argument("--tokens", type=float, default=4e5, help="training tokens per run (default 4e5)")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary (default 1024)")
    p.add_argument("--device", default="auto", help="train.device: auto, cpu, cuda")
    p.add_argument("--dtype", default="float32", help="train.dtype: float32, bfloat16, auto")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra overrides for both runs, e.g. model.n_layer=12 model.n_embd=768",
    )
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir, data_dir = prepare_data(out, args.inputs, args.vocab_size)
    budget = int(args.tokens)
    extra = dict(kv.split("=", 1) for kv in args.set)
    for name in RUNS:
        settings = {
            "data.dataset": str(data_dir),
            "data.tokenizer": str(tok_dir),
            "train.run_dir": str(out / name),
            "train.device": args.device,
            "train.dtype": args.dtype,
            **budget_overrides(name, budget),
            **extra,
        }
        overrides = [f"--{k}={v}" for k, v in settings.items()]
        if (out / name / "checkpoints").is_dir():
            print(f"{out / name} already trained; delete it to train again", flush=True)
        else:
            gptlab("train", "--config", HERE / f"{name}.toml", *overrides)
        gptlab("report", out / name, "--prompt", "def ")
    runs = [out / name for name in RUNS]
    gptlab("compare", *runs, "--plot", out / "loss_curves.png", "--markdown", stdout=out / "runs.md")
    gptlab(
        "compare",
        *(out / name / "config.json" for name in RUNS),
        "--tokens",
        str(budget),
        "--markdown",
        stdout=out / "sizing.md",
    )
    for f in ("runs.md", "sizing.md"):
        print(f"\n{out / f}:\n{(out / f).read_text()}")
    print(f"loss curves: {out / 'loss_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
