"""Speculative decoding at batch 1 on CPU: plain decoding vs a draft model and vs prompt lookup, K = 2..8.

Two workloads on checkpoints trained on the same corpus with the same tokenizer (the README says which
sizes, for how long, and the commands):

* draft: greedy continuations of the starts of held-out standard-library functions, verified by the
  target, drafted by the small model (`--target`, `--draft`);
* lookup: "the same code again, one name changed": a function, a blank line, then the function's first
  line with one name renamed; the continuation repeats spans of the prompt, which prompt lookup drafts
  (no draft model; up to K tokens a step, 2 more after a draft kept whole, 1 fewer after a cut one).

For every K the table gives tokens/s without and with speculation (medians of `--runs` rounds; each
round times plain and speculative decoding of every prompt back to back, so a noisy neighbour hits
both), the measured acceptance rate a (accepted / drafted tokens), the speed-up that rate predicts,
(1 - a^(K+1)) / ((1 - a)(1 + cK)) with c the draft model's step cost over the target's (measured
here; 0 for prompt lookup), and the measured speed-up; beside them, what one forward over K + 1
positions costs against one over a single position (the formula counts it 1). "measured" times whole
generations, the prompt's forward included; "decoding" times what follows it (the tokens after the first,
as llama.cpp's eval rate and vLLM's time per output token count), the part speculation speeds up.
Greedy output is checked to equal plain decoding's token for token.

    python benchmarks/speculative.py --target runs/target --draft runs/draft
    python benchmarks/speculative.py --target T --draft D --ks 2 4 --runs 1 --new-tokens 32   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Starts of functions from modules the default corpus keeps out of training (the held-out split is by
# file; these are written in the standard library's style, not copied from it).
DRAFT_PROMPTS = [
    "def _splitext(p, sep, altsep, extsep):\n    \"\"\"Split the extension from a pathname.\n\n",
    "class Counter(dict):\n    def __init__(self, iterable=None, /, **kwds):\n        super().__init__()\n",
    "def read_config(path):\n    with open(path, encoding='utf-8') as f:\n        for line in f:\n",
    "    def __repr__(self):\n        return '%s(%r)' % (self.__class__.__name__,",
    "import os\nimport sys\n\n\ndef main(argv=None):\n    if argv is None:\n        argv = sys.argv[1:]\n",
    "    def close(self):\n        \"\"\"Close the file.\"\"\"\n        if self._file is not None:\n",
]

LOOKUP_SOURCES = [
    (
        "def parse_header(line, strict=False):\n"
        "    key, sep, value = line.partition(':')\n"
        "    if not sep:\n"
        "        if strict:\n"
        "            raise ValueError('malformed header: %r' % (line,))\n"
        "        return None\n"
        "    key = key.strip().lower()\n"
        "    value = value.strip()\n"
        "    return key, value\n",
        "parse_header",
        "split_header",
    ),
    (
        "class Buffer:\n"
        "    def __init__(self, size):\n"
        "        self.size = size\n"
        "        self.data = bytearray(size)\n"
        "        self.pos = 0\n"
        "\n"
        "    def write(self, chunk):\n"
        "        end = self.pos + len(chunk)\n"
        "        if end > self.size:\n"
        "            raise ValueError('buffer full')\n"
        "        self.data[self.pos:end] = chunk\n"
        "        self.pos = end\n"
        "        return len(chunk)\n",
        "Buffer",
        "ByteBuffer",
    ),
    (
        "def walk_files(top, suffix='.py'):\n"
        "    for root, dirs, files in os.walk(top):\n"
        "        dirs.sort()\n"
        "        for name in sorted(files):\n"
        "            if name.endswith(suffix):\n"
        "                yield os.path.join(root, name)\n",
        "walk_files",
        "python_files",
    ),
]


def lookup_prompts() -> list[str]:
    """A function, then its first line with one name changed: the rest repeats the function."""
    return [f"{source}\n\n{source.splitlines()[0].replace(old, new)}\n" for source, old, new in LOOKUP_SOURCES]


def decode(model, ids: list[int], new: int, speculation=None):
    """Greedy tokens, seconds, and the engine's speculation counters for one prompt at batch 1 (an
    engine of its own each time); the seconds are the whole generation's and, as `.decoding`, those
    after the prompt's forward (which gives the first token): the decoding that speculation speeds up."""
    from gptlab.infer.engine import InferenceEngine
    from gptlab.infer.generate import generate_ids

    engine = InferenceEngine(model, kv_cache_tokens=len(ids) + new + 64)
    forward, prefilled = engine.forward, []

    def timed_forward(*args, **kwargs):
        logits = forward(*args, **kwargs)
        prefilled.append(prefilled[0] if prefilled else time.perf_counter())
        return logits

    engine.forward = timed_forward
    start = time.perf_counter()
    out = generate_ids(model, [ids], max_new_tokens=new, temperature=0, engine=engine, speculative=speculation)[0]
    end = time.perf_counter()
    return out, Seconds(end - start, end - prefilled[0]), engine.speculation


class Seconds(float):
    """A generation's seconds, with `.decoding`: those after the prompt's forward."""

    def __new__(cls, total: float, decoding: float) -> Seconds:
        self = super().__new__(cls, total)
        self.decoding = decoding
        return self


def step_seconds(model, ids: list[int], new: int) -> float:
    """Seconds per decoding step at batch 1 (plain greedy decoding of `new` tokens)."""
    _, seconds, _ = decode(model, ids, new)
    _, again, _ = decode(model, ids, new)
    return min(seconds.decoding, again.decoding) / (new - 1)


def verify_cost(model, ids: list[int], k: int, repeats: int = 30) -> float:
    """Seconds of one forward over K + 1 new positions of a sequence over those of one position (the
    formula counts them equal); minimums, which a noisy neighbour cannot lower."""
    from gptlab.infer.engine import InferenceEngine

    engine = InferenceEngine(model, kv_cache_tokens=len(ids) + k + 64)
    seq = engine.sequence(ids)
    engine.forward([seq])
    best = {}
    for n in (1, k + 1):
        times = []
        for _ in range(repeats):
            seq.tokens.extend(ids[1 : n + 1])
            start = time.perf_counter()
            engine.forward([seq], [n])
            times.append(time.perf_counter() - start)
            engine.truncate(seq, len(ids))
        best[n] = min(times)
    return best[k + 1] / best[1]


def run_workload(name, target, prompts, new, ks, runs, make_spec, c):
    """Rows of the table for one workload: per K, plain and speculative tokens/s and acceptance over all
    prompts; and per prompt (the acceptance of one kind of text differs from another's)."""
    rows, per_prompt = [], []
    decode(target, prompts[0], 8)  # warm up (kernels, allocator)
    for k in ks:
        spec = make_spec(k)
        decode(target, prompts[0], 8, spec)
        plain_rates, spec_rates = [], []
        totals = [dict(drafted=0, accepted=0, steps=0, tokens=0, plain=[], spec=[], plain_decoding=[],
                       spec_decoding=[]) for _ in prompts]  # fmt: skip
        decoding_gains = []
        for _ in range(runs):
            plain_tokens = plain_time = spec_tokens = spec_time = plain_decoding = spec_decoding = 0.0
            for ids, t in zip(prompts, totals):
                want, seconds, _ = decode(target, ids, new)
                plain_tokens, plain_time = plain_tokens + len(want), plain_time + seconds
                plain_decoding += seconds.decoding
                t["plain"].append(len(want) / seconds)
                t["plain_decoding"].append((len(want) - 1) / seconds.decoding)
                got, seconds, stats = decode(target, ids, new, spec)
                if got != want:
                    raise SystemExit(f"{name} K={k}: speculative greedy output differs from plain decoding")
                spec_tokens, spec_time = spec_tokens + len(got), spec_time + seconds
                spec_decoding += seconds.decoding
                t["spec"].append(len(got) / seconds)
                t["spec_decoding"].append((len(got) - 1) / seconds.decoding)
                for key in ("drafted", "accepted", "steps", "tokens"):
                    t[key] += getattr(stats, key)
            plain_rates.append(plain_tokens / plain_time)
            spec_rates.append(spec_tokens / spec_time)
            # the same tokens after the first, each way: the ratio of the decoding seconds
            decoding_gains.append(plain_decoding / spec_decoding)
        rows.append(_row(name, k, c, statistics.median(plain_rates), statistics.median(spec_rates), totals))
        rows[-1]["measured_decoding"] = statistics.median(decoding_gains)
        rows[-1]["verify_cost"] = verify_cost(target, prompts[0], k)
        for i, t in enumerate(totals):
            plain, fast = statistics.median(t["plain"]), statistics.median(t["spec"])
            gain = statistics.median(t["spec_decoding"]) / statistics.median(t["plain_decoding"])
            per_prompt.append({**_row(name, k, c, plain, fast, [t]), "prompt": i, "measured_decoding": gain})
        r = rows[-1]
        print(f"  {name} K={k}: {r['plain']:.1f} -> {r['speculative']:.1f} tok/s, a={r['acceptance']:.2f}, "
              f"predicted {r['predicted']:.2f}x, measured {r['measured']:.2f}x "
              f"(decoding {r['measured_decoding']:.2f}x)", flush=True)  # fmt: skip
    return rows, per_prompt


def _row(name: str, k: int, c: float, plain: float, fast: float, totals: list[dict]) -> dict:
    drafted, accepted = sum(t["drafted"] for t in totals), sum(t["accepted"] for t in totals)
    steps, tokens = sum(t["steps"] for t in totals), sum(t["tokens"] for t in totals)
    a = accepted / drafted if drafted else 0.0
    predicted = (1 - a ** (k + 1)) / ((1 - a) * (1 + c * k)) if a < 1 else (k + 1) / (1 + c * k)
    return dict(workload=name, k=k, plain=plain, speculative=fast, acceptance=a,
                tokens_per_step=tokens / steps if steps else 0.0, c=c, predicted=predicted,
                measured=fast / plain)  # fmt: skip


def print_table(rows: list[dict], first: str) -> None:
    verify = all("verify_cost" in r for r in rows)
    extra = " verify / step |" if verify else ""
    head = f"| {first} | K | plain tok/s | speculative tok/s | acceptance | tokens / step |"
    print(f"{head}{extra} predicted | measured | decoding |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if verify else ""))
    for r in rows:
        label = r["workload"] if first == "workload" else f"{r['workload']} #{r['prompt']}"
        cost = f" {r['verify_cost']:.2f} |" if verify else ""
        print(f"| {label} | {r['k']} | {r['plain']:.1f} | {r['speculative']:.1f} | {r['acceptance']:.2f} | "
              f"{r['tokens_per_step']:.2f} |{cost} {r['predicted']:.2f}x | {r['measured']:.2f}x | "
              f"{r['measured_decoding']:.2f}x |")  # fmt: skip


def plot(rows: list[dict], path: str, title: str) -> None:
    """Speed-up against K per workload: measured (whole generations and decoding) beside predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
    for ax, name in zip(axes[0], workloads, strict=True):
        got = [r for r in rows if r["workload"] == name]
        ks = [r["k"] for r in got]
        ax.plot(ks, [r["measured_decoding"] for r in got], "o-", label="measured, decoding")
        ax.plot(ks, [r["measured"] for r in got], "s--", label="measured, whole generation")
        ax.plot(ks, [r["predicted"] for r in got], ":", color="gray", label="predicted from acceptance")
        ax.axhline(1.0, color="black", linewidth=0.8)
        for r in got:
            ax.annotate(f"a={r['acceptance']:.2f}", (r["k"], r["measured_decoding"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)  # fmt: skip
        ax.set(title=name, xlabel="K (tokens drafted per step)", ylabel="speed-up over plain decoding")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="target checkpoint (run dir or checkpoint dir)")
    parser.add_argument("--draft", help="draft checkpoint with the target's tokenizer (the draft workload)")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8], help="tokens drafted per step")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--prompt-lookup", type=int, default=3, help="n-gram length for prompt lookup")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (medians)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--workloads", nargs="+", default=["draft", "lookup"], choices=["draft", "lookup"])
    parser.add_argument("--per-prompt-k", type=int, default=4, help="K of the per-prompt table")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights of both models")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--png", help="also plot the speed-ups against K here")
    args = parser.parse_args()

    from gptlab.infer.prepare import load_for_generation
    from gptlab.infer.speculative import Speculation
    from gptlab.reports.run_report import cpu_name

    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer = load_for_generation(args.target, dtype=args.dtype)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; batch 1, greedy, {args.new_tokens} new tokens, "
          f"{args.dtype} weights")  # fmt: skip
    rows, per_prompt = [], []
    if "draft" in args.workloads:
        if not args.draft:
            raise SystemExit("the draft workload needs --draft CKPT (or --workloads lookup)")
        draft, _ = load_for_generation(args.draft, tokenizer=args.target, dtype=args.dtype)
        prompts = [tokenizer.encode(p) for p in DRAFT_PROMPTS]
        c = step_seconds(draft, prompts[0], 64) / step_seconds(target, prompts[0], 64)
        print(f"draft step / target step: c = {c:.3f}", flush=True)
        got = run_workload("draft model", target, prompts, args.new_tokens, args.ks, args.runs,
                           lambda k: Speculation(draft=draft, num_tokens=k), c)  # fmt: skip
        rows, per_prompt = rows + got[0], per_prompt + got[1]
    if "lookup" in args.workloads:
        prompts = [tokenizer.encode(p) for p in lookup_prompts()]
        got = run_workload("prompt lookup", target, prompts, args.new_tokens, args.ks, args.runs,
                           lambda k: Speculation(prompt_lookup=args.prompt_lookup, num_tokens=k), 0.0)  # fmt: skip
        rows, per_prompt = rows + got[0], per_prompt + got[1]
    print()
    print_table(rows, "workload")
    print(f"\nPer prompt at K = {args.per_prompt_k}:\n")
    print_table([r for r in per_prompt if r["k"] == args.per_prompt_k], "prompt")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "per_prompt": per_prompt}, indent=1))
    if args.png:
        plot(rows, args.png, f"batch 1, greedy, {args.dtype}; {cpu_name()}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
