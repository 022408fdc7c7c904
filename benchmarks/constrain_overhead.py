"""What constrained decoding costs a real decoding step: GPT-2 124M (random weights, GPT-2's BPE),
batch 1 and 8, sampling under a JSON Schema against the same sampling unconstrained, in one process,
alternating, medians. The time per generated token includes everything: the model's step, the
grammar's mask (llguidance) and its application to the logits, the sampling step.

A random model never closes a JSON string, so under the schema below every row writes `{"text": "`
and then stays inside the string until the token limit, which keeps the lengths equal (both run to
`--tokens`; the unconstrained run meets end-of-text about once in 50,257 draws).

    python benchmarks/constrain_overhead.py [--runs 5] [--tokens 64] [--quantize int8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from gptlab.infer.constrain import Constraint
from gptlab.infer.generate import generate
from gptlab.infer.prepare import prepare_model
from gptlab.infer.sampling import SamplingParams
from gptlab.model import GPT
from gptlab.presets import preset
from gptlab.reports.run_report import cpu_name
from gptlab.reports.table import format_table
from gptlab.tokenizer import Tokenizer

DEFAULT_BPE_DIR = Path(__file__).resolve().parents[2] / "shared/fixtures/gpt2-bpe"
SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--quantize", choices=["int8"], default=None)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_BPE_DIR, help="GPT-2 encoder.json + vocab.bpe")
    args = parser.parse_args()

    tok = Tokenizer.gpt2(args.tokenizer)
    torch.manual_seed(0)
    model = GPT(preset("gpt2")).eval()
    prepare_model(model, quantize=args.quantize)
    prompt = "Reply with a JSON object: a short note about the weather."
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [prompt] * batch
        free = SamplingParams(max_new_tokens=args.tokens, temperature=1.0, seed=0, stop=[])
        bound = SamplingParams(
            max_new_tokens=args.tokens, temperature=1.0, seed=0, stop=[], constraint=Constraint.json_schema(SCHEMA)
        )
        generate(model, tok, prompts, free)  # warm-up: kernels, allocations, the grammar's tokenizer
        generate(model, tok, prompts, bound)
        times: dict[str, list[float]] = {"unconstrained": [], "JSON Schema": []}
        for _ in range(args.runs):
            for name, params in (("unconstrained", free), ("JSON Schema", bound)):
                t = time.perf_counter()
                out = generate(model, tok, prompts, params)
                elapsed = time.perf_counter() - t
                tokens = sum(len(c.token_ids) for c in out)
                times[name].append(elapsed / tokens * batch * 1e3)  # ms per step of the batch
        base = statistics.median(times["unconstrained"])
        for name, ts in times.items():
            ms = statistics.median(ts)
            overhead = "" if name == "unconstrained" else f"{(ms - base) / base:+.1%}"
            rows.append(
                {"batch": batch, "decoding": name, "ms per step": f"{ms:.2f}",
                 "tokens/s": f"{batch / ms * 1e3:.1f}", "overhead": overhead}
            )  # fmt: skip
    print(
        f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; GPT-2 124M (random weights), "
        f"{args.quantize or 'fp32'}, {args.tokens} sampled tokens a row, medians of {args.runs} alternating runs"
    )
    print()
    print(format_table(rows, markdown=True))


if __name__ == "__main__":
    main()
