"""Few-shot multiple choice with and without context reuse: items/s, the same scores.

A 5-shot, 4-choice task (the animal multiple choice gptlab generates, 200 test items) scored by GPT-2
124M's shape (random weights; GPT-2's BPE from shared/fixtures when present, else a byte-level BPE
trained on the standard library) on the CPU. Without reuse every choice's whole sequence runs through
the model (`score_tokens`, batches of 16 sequences, as lm-evaluation-harness does); with reuse each
item's prompt is computed once through the inference engine and each choice forks its KV blocks
(`score_shared`). Both runs in one process, alternated; medians; the CPU named.

    python benchmarks/eval_reuse.py [--items 200] [--shots 5] [--runs 3] [--preset gpt2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gptlab.reports.run_report import cpu_name  # noqa: E402

FIXTURE = ROOT.parent / "shared" / "fixtures" / "gpt2-bpe"


def tokenizer_and_model(preset_name: str):
    from gptlab.model import GPT
    from gptlab.presets import preset
    from gptlab.tokenizer import Tokenizer

    if (FIXTURE / "encoder.json").is_file():
        tokenizer = Tokenizer.from_pretrained(FIXTURE)
    else:
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:80]
        tokenizer = Tokenizer.train(files, vocab_size=preset(preset_name).vocab_size, show_progress=False)
    torch.manual_seed(0)
    return tokenizer, GPT(preset(preset_name, vocab_size=tokenizer.vocab_size)).eval()


def main(argv: list[str] | None = None) -> int:
    from gptlab.eval.fewshot import evaluate_task
    from gptlab.eval.tasks import EXAMPLE_TASKS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--runs", type=int, default=3, help="timed runs of each (median reported)")
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    tokenizer, model = tokenizer_and_model(args.preset)
    task = EXAMPLE_TASKS["animals_mc"](random.Random(1234), 32, args.items)
    prompts_tokens = [len(tokenizer.encode(task.prompt(it, task.sample_examples(it, args.shots, random.Random(0)))))
                      for it in task.test[:20]]  # fmt: skip
    times: dict[bool, list[float]] = {False: [], True: []}
    results: dict[bool, dict] = {}
    for _ in range(args.runs):
        for reuse in (False, True):
            start = time.perf_counter()
            results[reuse] = evaluate_task(model, tokenizer, task, shots=args.shots, batch_size=args.batch_size,
                                           reuse=reuse)  # fmt: skip
            times[reuse].append(time.perf_counter() - start)
    same_acc = results[False]["metrics"]["acc"] == results[True]["metrics"]["acc"]
    same_norm = results[False]["metrics"]["acc_norm"] == results[True]["metrics"]["acc_norm"]
    lls = [(a["loglikelihoods"], b["loglikelihoods"]) for a, b in zip(results[False]["items"],
                                                                        results[True]["items"], strict=True)]
    worst = max(abs(x - y) for a, b in lls for x, y in zip(a, b, strict=True))
    rate = {k: args.items / statistics.median(v) for k, v in times.items()}
    print(f"\n{args.shots}-shot, 4-choice multiple choice, {args.items} items, {args.preset} "
          f"({sum(q.numel() for q in model.parameters()) / 1e6:.0f}M parameters, fp32), "
          f"prompts ~{statistics.median(prompts_tokens):.0f} tokens; {cpu_name()}, {torch.get_num_threads()} threads, "
          f"median of {args.runs}\n")  # fmt: skip
    print("| scoring | items/s | s per run | acc | acc_norm |")
    print("|---|---:|---:|---:|---:|")
    for reuse, label in ((False, "every choice's whole sequence (score_tokens)"),
                         (True, "context once, choices fork its blocks (score_shared)")):  # fmt: skip
        m = results[reuse]["metrics"]
        print(f"| {label} | {rate[reuse]:.2f} | {statistics.median(times[reuse]):.1f} | {m['acc']:.3f} | "
              f"{m['acc_norm']:.3f} |")  # fmt: skip
    print(f"\nspeed-up {rate[True] / rate[False]:.2f}x; acc identical: {same_acc}, acc_norm identical: {same_norm}; "
          f"largest log-likelihood difference {worst:.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
