"""RL on the shipped arithmetic task, end to end on a CPU: a tiny model, SFT to the answer format, then
GRPO with an exact-match reward, and the held-out exact match before and after.

    python examples/posttrain/arithmetic_rl.py --out runs/arith [--sft-steps 600] [--rl-minutes 15]

Every stage is a `gptlab` command (printed before it runs), so the recipe is also the CLI walkthrough:
  1. data      `arithmetic_2digit` problems (gptlab.eval.tasks, `Q: What is 37 plus 47?\nA:` -> ` 84`):
               SFT pairs, RL prompts with their answers, and held-out problems no stage trains on
  2. base      a 4-layer, 128-wide GPT on a byte-level tokenizer (one token per character), untrained
  3. sft       `gptlab finetune --task sft`: the answer format and some of the sums
  4. rl        `gptlab finetune --task rl --reward exact_match`: held-out exact match every few steps
  5. plot      reward and held-out exact match by step (OUT/rl_curve.png)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_data(out: Path, n_sft: int, n_rl: int, n_test: int, seed: int) -> dict[str, Path]:
    from gptlab.eval.tasks import EXAMPLE_TASKS

    task = EXAMPLE_TASKS["arithmetic_2digit"](random.Random(seed), n_sft + n_rl, n_test)  # distinct pairs
    train, test = list(task.train), list(task.test)
    sft = [{"prompt": it.context, "completion": " " + it.target} for it in train[:n_sft]]
    rl = [{"prompt": it.context, "answer": it.target} for it in train[n_sft:]]
    held_out = [{"prompt": it.context, "answer": it.target} for it in test]
    return {
        "sft": write_jsonl(out / "sft.jsonl", sft),
        "rl": write_jsonl(out / "rl_prompts.jsonl", rl),
        "test": write_jsonl(out / "held_out.jsonl", held_out),
        "test_sft": write_jsonl(out / "held_out_sft.jsonl", [
            {"prompt": r["prompt"], "completion": " " + r["answer"]} for r in held_out]),
    }


def make_base(out: Path, seed: int) -> Path:
    import torch

    from gptlab.checkpoint import save_model
    from gptlab.config import ModelConfig
    from gptlab.model import GPT
    from gptlab.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["qzqzqz "] * 20, vocab_size=258, show_progress=False)  # one token per character
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=4, n_head=4, n_embd=128, n_ctx=32, vocab_size=tokenizer.vocab_size))
    return save_model(model, out / "base", tokenizer)


def gptlab(*args: str) -> None:
    command = [sys.executable, "-m", "gptlab", *args]
    print("$ gptlab " + " ".join(args), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    subprocess.run(command, check=True, env=env)


def exact_match(checkpoint: Path, held_out: Path) -> float:
    from gptlab.checkpoint import load_model, load_tokenizer
    from gptlab.infer.generate import generate

    model, tokenizer = load_model(checkpoint), load_tokenizer(checkpoint)
    records = [json.loads(x) for x in held_out.read_text().splitlines()]
    completions = generate(model, tokenizer, [r["prompt"] for r in records], temperature=0, max_new_tokens=6)
    return sum(c.text.strip() == r["answer"] for c, r in zip(completions, records, strict=True)) / len(records)


def plot(metrics: Path, out: Path, before: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    train = [(r["step"], r["reward"]) for r in rows if "reward" in r]
    val = [(0, before)] + [(r["step"], r["val_reward"]) for r in rows if "val_reward" in r]
    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.add_subplot()
    ax.plot(*zip(*train, strict=True), label="rollout reward (mean exact match of samples)", linewidth=0.6, alpha=0.4)
    window = 25
    smooth = [
        (train[i][0], sum(v for _, v in train[i - window + 1 : i + 1]) / window) for i in range(window - 1, len(train))
    ]
    if smooth:
        ax.plot(*zip(*smooth, strict=True), color="C0", label=f"rollout reward, mean of {window} steps", linewidth=1.5)
    ax.plot(*zip(*val, strict=True), "o-", label="held-out exact match (greedy)", markersize=3)
    ax.set_xlabel("RL step (GRPO)")
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/arith-rl")
    p.add_argument("--sft-steps", type=int, default=500)
    p.add_argument("--rl-steps", type=int, default=3000, help="RL steps (the cosine schedule spans them)")
    p.add_argument("--rl-minutes", type=float, default=15.0, help="time limit of the RL stage (the issue: 15 min)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(out, n_sft=2000, n_rl=4000, n_test=200, seed=args.seed)
    base = make_base(out, args.seed)
    threads = f"--train.threads={args.threads}"
    gptlab("finetune", "--task", "sft", "--base", str(base), "--train", str(data["sft"]), "--val",
           str(data["test_sft"]), "--out", str(out / "sft"), "--max-steps", str(args.sft_steps), "--lr", "3e-3",
           "--batch-size", "64", "--eval-interval", str(args.sft_steps), "--keep-last", "--no-progress",
           "--train.tensorboard=false", threads)
    before = exact_match(out / "sft", data["test"])
    print(f"held-out exact match after SFT: {before:.3f}", flush=True)
    began = time.perf_counter()
    gptlab("finetune", "--task", "rl", "--base", str(out / "sft"), "--prompts", str(data["rl"]), "--reward",
           "exact_match", "--val", str(data["test"]), "--out", str(out / "rl"), "--max-steps", str(args.rl_steps),
           "--batch-size", "16", "--group-size", "8", "--max-new-tokens", "6", "--lr", "3e-4",
           "--warmup-steps", "0", "--eval-interval", "50", "--keep-last", "--no-progress",
           f"--train.time_limit={args.rl_minutes}", "--train.log_interval=1", "--train.tensorboard=false", threads)
    minutes = (time.perf_counter() - began) / 60
    after = exact_match(out / "rl", data["test"])
    print(f"held-out exact match: {before:.3f} after SFT -> {after:.3f} after RL "
          f"({100 * (after - before):+.1f} points; RL stage {minutes:.1f} min)", flush=True)
    print(f"wrote {plot(out / 'rl/train/metrics.jsonl', out / 'rl_curve.png', before)}")
    summary = {"exact_match_after_sft": before, "exact_match_after_rl": after, "rl_minutes": minutes}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
