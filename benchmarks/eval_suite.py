"""`gptlab eval suite` scoring against lm-evaluation-harness's Hugging Face backend: items/s, same scores.

HellaSwag-style 4-choice items (the fixture items of tests/fixtures/eval_suite/hellaswag, repeated with
their endings rotated, to --items), lm-eval's prompt style, GPT-2 124M's shape with random weights
(saved by transformers, loaded by both), GPT-2's BPE, fp32 on the CPU. lm-eval runs its stock
`hellaswag` task on the same files (`dataset_path: json`). Both timed in one process, after loading.

    flock /tmp/gptlab-heavy.lock python benchmarks/eval_suite.py [--items 40] [--shots 0,5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gptlab.reports.run_report import cpu_name  # noqa: E402

BPE = ROOT.parent / "shared" / "fixtures" / "gpt2-bpe"
FIXTURE = ROOT / "tests/fixtures/eval_suite/hellaswag"


def write_data(root: Path, n: int) -> Path:
    val = [json.loads(x) for x in (FIXTURE / "hellaswag_val.jsonl").read_text().splitlines()]
    docs = []
    for i in range(n):
        d = dict(val[i % len(val)])
        k = (i // len(val)) % 4
        d["endings"] = d["endings"][k:] + d["endings"][:k]
        d["label"] = (d["label"] - k) % 4
        docs.append(d)
    (root / "hellaswag").mkdir(parents=True)
    (root / "hellaswag/hellaswag_val.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    shutil.copy(FIXTURE / "hellaswag_train.jsonl", root / "hellaswag/hellaswag_train.jsonl")
    return root


def main(argv: list[str] | None = None) -> int:
    import lm_eval
    import lm_eval.models.huggingface as hf_backend
    import transformers
    import yaml
    from lm_eval.tasks import TaskManager

    from gptlab.checkpoint import load_model
    from gptlab.eval.suite import evaluate_suite_task
    from gptlab.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=40)
    p.add_argument("--shots", default="0,5")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().save_pretrained(tmp / "gpt2")
    shutil.copy(BPE / "encoder.json", tmp / "gpt2/vocab.json")
    shutil.copy(BPE / "vocab.bpe", tmp / "gpt2/merges.txt")
    data = write_data(tmp / "data", args.items)
    tasks = tmp / "tasks"
    tasks.mkdir()
    stock = Path(lm_eval.__file__).parent / "tasks/hellaswag/hellaswag.yaml"
    files = {split: str(data / f"hellaswag/hellaswag_{name}.jsonl") for split, name in
             (("validation", "val"), ("train", "train"))}  # fmt: skip
    config = {"include": str(stock), "task": "hellaswag", "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": files}}  # fmt: skip
    (tasks / "hellaswag.yaml").write_text(yaml.safe_dump(config))
    model, tok = load_model(tmp / "gpt2"), Tokenizer.gpt2(BPE)
    lm = hf_backend.HFLM(pretrained=str(tmp / "gpt2"), dtype="float32", device="cpu", batch_size=args.batch_size)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], task_manager=manager, num_fewshot=0, limit=4)  # warm-up
    evaluate_suite_task(model, tok, "hellaswag", 0, data=data, style="lm-eval", limit=4)
    print(f"\nHellaSwag-style 4-choice, {args.items} items, GPT-2 124M shape (random weights, fp32), lm-eval "
          f"{lm_eval.__version__} hf backend vs gptlab; {cpu_name()}, {torch.get_num_threads()} threads\n")  # fmt: skip
    print("| shots | lm-eval hf items/s | gptlab items/s | speed-up | lm-eval acc / acc_norm | gptlab acc / acc_char |")
    print("|---:|---:|---:|---:|---:|---:|")
    for shots in [int(s) for s in args.shots.split(",")]:
        began = time.perf_counter()
        run = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], task_manager=manager, num_fewshot=shots,
                                      bootstrap_iters=10)  # fmt: skip
        theirs_s = time.perf_counter() - began
        began = time.perf_counter()
        mine = evaluate_suite_task(model, tok, "hellaswag", shots, data=data, style="lm-eval",
                                   batch_size=args.batch_size)  # fmt: skip
        ours_s = time.perf_counter() - began
        r, m = run["results"]["hellaswag"], mine["metrics"]
        print(f"| {shots} | {args.items / theirs_s:.2f} | {args.items / ours_s:.2f} | {theirs_s / ours_s:.2f}x | "
              f"{r['acc,none']:.3f} / {r['acc_norm,none']:.3f} | {m['acc']:.3f} / {m['acc_char']:.3f} |",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
