"""Decoding speed on CPU: gptlab vs Hugging Face transformers vs CTranslate2 on the same weights.

GPT-2 124M with random weights (speed does not depend on their values), saved once in Hugging Face
format; gptlab loads that directory, transformers loads it, and CTranslate2 converts it in a temp dir.
Workloads: a 32-token prompt then 128 greedy tokens at batch 1 and batch 8, and time to first
token after a 1023-token prompt (the "1024 prefill"). Every configuration runs once untimed, then
`--runs` times interleaved with the others (so a noisy neighbour hits all alike); we report medians.
Each engine runs in a process of its own, one after another (`--in-process` puts them all in one):
CTranslate2 brings its own OpenMP runtime, whose threads, once it has run, slowed gptlab and torch
in the same process by a fifth to a third here.

Batch-1 decoding reads every weight once per token, so it cannot beat bandwidth / weight bytes per
token; the table gives each engine's fraction of that bound, the bandwidth measured by streaming a
1 GiB buffer through the cores (read only, as decoding reads its weights) just before each timed
batch-1 round: it drifts within seconds with the machine's neighbours, and each round is held to
the bound of its moment. (Weights that stay in a large last-level cache between tokens can beat it.)

    python benchmarks/decode.py                      # everything, all cores, 3 runs
    python benchmarks/decode.py --threads 1 --runs 5 --engines gptlab transformers
    python benchmarks/decode.py --quick              # 1 run, 32 new tokens: check that it works
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRECISIONS = ("fp32", "bf16", "int8")
ENGINES = ("gptlab", "gptlab-torch", "transformers", "ctranslate2")
BYTES = {"fp32": 4, "bf16": 2, "int8": 1}


@functools.cache
def _read_buffer(mb: int) -> torch.Tensor:
    from gptlab.infer.cpu import kernels as cpu_kernels

    buffer = cpu_kernels.huge_page_buffer(mb * 2**20).view(torch.float32)  # in huge pages, as the weights
    return buffer.fill_(1.0)


def measure_bandwidth(mb: int = 1024, repeats: int = 7) -> float:
    """GB/s at which the cores stream a large buffer (1 GiB: well beyond the caches), read as the
    kernels read their weights (`gptlab.infer.cpu.kernels.read_sum`: vector loads with software prefetch);
    without the kernels, torch's sum (which reads more slowly here, so the bound is lower)."""
    from gptlab.infer.cpu import kernels as cpu_kernels

    buffer = _read_buffer(mb)
    read = cpu_kernels.read_sum if cpu_kernels.available() else torch.sum
    read(buffer)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        read(buffer)
        times.append(time.perf_counter() - t)
    time.sleep(0.05)  # the kernels' OpenMP threads stop spinning before the engine under test runs
    return buffer.nbytes / statistics.median(times) / 1e9


def weight_bytes_per_token(config, precision: str) -> int:
    """Bytes of matmul weights read to decode one token: every block's linear layers and the output
    projection; embeddings contribute one row each, negligible."""
    matmul_params = config.n_params(embeddings=False) + config.vocab_size * config.n_embd
    return matmul_params * BYTES[precision]


# ---- engines: each returns {workload: callable} ---------------------------------------------------
def gptlab_engine(hf_dir: Path, precision: str, compile: bool, kernels: bool = True) -> dict[str, Callable[[], int]]:
    from gptlab.checkpoint import load_model
    from gptlab.infer.engine import InferenceEngine
    from gptlab.infer.generate import generate_ids
    from gptlab.infer.prepare import prepare_model

    # What `gptlab generate --dtype ... [--quantize int8] [--compile]` runs.
    model = load_model(hf_dir, dtype=torch.bfloat16 if precision == "bf16" else None)
    prepare_model(model, quantize="int8" if precision == "int8" else None, pack=not compile, kernels=kernels)

    def decode(prompts: list[list[int]], new: int) -> Callable[[], int]:
        def run() -> int:
            out = generate_ids(model, prompts, max_new_tokens=new, temperature=0, compile=compile)
            assert all(len(o) == new for o in out)
            return len(prompts) * new

        return run

    def prefill(prompt: list[int]) -> Callable[[], int]:
        def run() -> int:
            engine = InferenceEngine(model, kv_cache_tokens=len(prompt) + 16, prefix_caching=False)
            engine.forward([engine.sequence(prompt)])
            return len(prompt)

        return run

    return dict(decode=decode, prefill=prefill)


def transformers_engine(hf_dir: Path, precision: str) -> dict[str, Callable[[], int]] | None:
    if precision == "int8":
        return None  # transformers has no int8 CPU path for GPT-2's Conv1D layers
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early

    def decode(prompts: list[list[int]], new: int) -> Callable[[], int]:
        ids = torch.tensor(prompts)

        def run() -> int:
            with torch.inference_mode():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                )
            assert out.shape[1] == ids.shape[1] + new
            return len(prompts) * new

        return run

    def prefill(prompt: list[int]) -> Callable[[], int]:
        ids = torch.tensor([prompt])

        def run() -> int:
            with torch.inference_mode():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=1,
                    do_sample=False,
                    pad_token_id=0,
                )
            return len(prompt)

        return run

    return dict(decode=decode, prefill=prefill)


class _Vocabulary:
    """The part of a Hugging Face tokenizer CTranslate2's GPT-2 loader reads: `get_vocab()` and the
    bos / eos / unk tokens."""

    def __init__(self, tokens: list[str], eos: str) -> None:
        self._ids = {token: i for i, token in enumerate(tokens)}
        self.bos_token = self.eos_token = self.unk_token = eos

    def get_vocab(self) -> dict[str, int]:
        return dict(self._ids)


def ctranslate2_vocabulary(hf_dir: Path) -> _Vocabulary:
    """The vocabulary given to CTranslate2's converter: the directory's vocab.json (GPT-2's, written
    by make_weights where the fixture exists), else one placeholder token per id with <|endoftext|> at
    the eos id. The benchmark feeds token ids, mapped to these strings through the converted model's
    vocabulary.json, so either gives the same model and the same timings."""
    config = json.loads((hf_dir / "config.json").read_text())
    size = config["vocab_size"]
    eos_id = config.get("eos_token_id")
    eos_id = size - 1 if eos_id is None else eos_id
    file = hf_dir / "vocab.json"
    if file.is_file():
        ids = json.loads(file.read_text())
        if sorted(ids.values()) != list(range(size)):
            raise ValueError(f"{file} holds {len(ids)} tokens, not the ids 0..{size - 1} of the model's vocabulary")
        tokens = sorted(ids, key=ids.__getitem__)
    else:
        tokens = [f"<|id{i}|>" for i in range(size)]
        tokens[eos_id] = "<|endoftext|>"
    return _Vocabulary(tokens, tokens[eos_id])


def convert_ctranslate2(hf_dir: Path, out: Path, quantization: str) -> None:
    """CTranslate2's Transformers converter with the vocabulary given explicitly. Left to itself it
    takes the vocabulary from `AutoTokenizer.from_pretrained(hf_dir)`, and transformers 5 answers a
    directory without tokenizer files (a fresh install has no GPT-2 BPE to copy in) with a GPT-2
    tokenizer of one token instead of an error: "Vocabulary has size 1 but the model expected a
    vocabulary of size 50257"."""
    import ctranslate2

    vocabulary = ctranslate2_vocabulary(hf_dir)

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return vocabulary

    Converter(str(hf_dir)).convert(str(out), quantization=quantization)
    size = len(json.loads((out / "vocabulary.json").read_text()))
    if size != len(vocabulary.get_vocab()):
        raise ValueError(f"the converted vocabulary has {size} tokens, not {len(vocabulary.get_vocab())}")


def ctranslate2_engine(hf_dir: Path, precision: str, work: Path, threads: int) -> dict | None:
    try:
        import ctranslate2
    except ImportError:
        return None
    compute = {"fp32": "float32", "int8": "int8"}.get(precision)
    if compute is None or compute not in ctranslate2.get_supported_compute_types("cpu"):
        return None
    out = work / f"ct2-{precision}"
    if not out.exists():
        convert_ctranslate2(hf_dir, out, compute)
    generator = ctranslate2.Generator(str(out), device="cpu", compute_type=compute, intra_threads=threads)
    vocab = json.loads((out / "vocabulary.json").read_text())

    def decode(prompts: list[list[int]], new: int) -> Callable[[], int]:
        tokens = [[vocab[i] for i in p] for p in prompts]

        def run() -> int:
            res = generator.generate_batch(
                tokens, max_length=new, min_length=new, sampling_topk=1, include_prompt_in_result=False
            )
            assert all(len(r.sequences_ids[0]) == new for r in res)
            return len(prompts) * new

        return run

    def prefill(prompt: list[int]) -> Callable[[], int]:
        tokens = [[vocab[i] for i in prompt]]

        def run() -> int:
            generator.generate_batch(tokens, max_length=1, sampling_topk=1, include_prompt_in_result=False)
            return len(prompt)

        return run

    return dict(decode=decode, prefill=prefill)


# ---- quality: perplexity at each precision ---------------------------------------------------------
def quality(checkpoint: Path, data: Path | None, max_tokens: int = 8192) -> list[dict]:
    """Perplexity of the checkpoint at each precision on held-out tokens, and top-1 agreement with
    float32. `data`: a UTF-8 text file (encoded with the checkpoint's tokenizer) or a gptlab .bin
    token shard; default: the repository's docs."""
    import numpy as np

    from gptlab.checkpoint import load_model, load_tokenizer
    from gptlab.infer.cpu import kernels as cpu_kernels
    from gptlab.infer.prepare import prepare_model
    from gptlab.infer.quantize import quantize_int8

    config = load_model(checkpoint).config
    if data is not None and data.suffix == ".bin":
        ids = np.fromfile(data, dtype=np.uint16).astype(np.int64).tolist()
    else:
        root = Path(__file__).resolve().parents[1]
        files = (
            [data]
            if data is not None
            else [f for f in (root / "README.md", root.parent / "shared/DESIGN.md") if f.is_file()]
        )
        ids = load_tokenizer(checkpoint).encode("\n\n".join(f.read_text() for f in files))
    T = config.n_ctx
    windows = torch.tensor(ids[: T * min(max(max_tokens // T, 1), len(ids) // T)]).view(-1, T)
    if len(windows) == 0:
        raise ValueError(f"need at least {T} tokens of held-out data, got {len(ids)}")
    rows, ref_top = [], None
    # The layers `gptlab generate` runs (prepare_model). Its int8 layers run fbgemm's dynamic int8 GEMM
    # on windows of many rows, as here, and the weight-only kernel on 1-2 rows (decoding at batch 1),
    # whose quality is that of torch's weight-only int8 GEMM on the same int8 values.
    for precision in ("fp32", "bf16", "int8", "int8-weight-only"):
        model = load_model(checkpoint, dtype=torch.bfloat16 if precision == "bf16" else None)
        if precision == "int8-weight-only":
            quantize_int8(model, mode="weight")
        elif precision != "fp32":
            prepare_model(model, quantize="int8" if precision == "int8" else None)
        nll, top = [], []
        with torch.inference_mode():
            for w in windows:
                logits, loss = model(w[None, :-1], w[None, 1:])
                nll.append(loss.item())
                top.append(logits.argmax(-1))
        top = torch.cat(top)
        ref_top = top if ref_top is None else ref_top
        agree = (top == ref_top).float().mean().item()
        rows.append(dict(precision=precision, perplexity=float(np.exp(np.mean(nll))), top1_agreement=agree))
    base = rows[0]["perplexity"]
    lines = [
        f"Quality on {windows.numel()} held-out tokens ({checkpoint}):",
        "",
        "| precision | perplexity | change vs fp32 | top-1 agreement with fp32 |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['precision']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% | "
            f"{100 * r['top1_agreement']:.2f}% |"
        )
    print("\n".join(lines))
    if cpu_kernels.available():  # the float16 cache is the fused step's
        rows += cache_quality(checkpoint, windows)
    return rows


def cache_quality(checkpoint: Path, windows: torch.Tensor) -> list[dict]:
    """What the float16 KV cache costs: perplexity of bf16 and int8 decoding token by token through
    the fused step (as `gptlab generate` runs batch 1), with the float16 cache it allocates and with a
    float32 one, on the same windows; and how often the two choose a different top-1 token."""
    import numpy as np

    from gptlab.checkpoint import load_model
    from gptlab.infer.engine import InferenceEngine
    from gptlab.infer.prepare import prepare_model

    rows = []
    for precision in ("bf16", "int8"):
        model = load_model(checkpoint, dtype=torch.bfloat16 if precision == "bf16" else None)
        prepare_model(model, quantize="int8" if precision == "int8" else None)
        runs = {}
        for cache_dtype in (torch.float32, torch.float16):
            nll, top = [], []
            for w in windows:
                engine = InferenceEngine(model, kv_cache_tokens=len(w), prefix_caching=False, kv_dtype=cache_dtype)
                seq = engine.sequence(w[:1].tolist())
                logits = [engine.forward([seq])]
                for t in range(1, len(w) - 1):
                    seq.tokens.append(int(w[t]))
                    logits.append(engine.forward([seq]))
                logp = torch.cat(logits).log_softmax(-1)
                nll.append(-logp.gather(1, w[1:, None]).mean().item())
                top.append(logp.argmax(-1))
            runs[cache_dtype] = (float(np.exp(np.mean(nll))), torch.cat(top))
        (p32, t32), (p16, t16) = runs[torch.float32], runs[torch.float16]
        agree = (t16 == t32).float().mean().item()
        rows.append(dict(precision=precision, ppl_fp32_cache=p32, ppl_fp16_cache=p16, top1_agreement=agree))
    lines = [
        "",
        f"The float16 KV cache (bf16 / int8 weights), decoding {windows.numel()} tokens one at a time:",
        "",
        "| weights | perplexity, float32 cache | float16 cache | change | top-1 agreement |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        change = 100 * (r["ppl_fp16_cache"] / r["ppl_fp32_cache"] - 1)
        lines.append(
            f"| {r['precision']} | {r['ppl_fp32_cache']:.4f} | {r['ppl_fp16_cache']:.4f} | {change:+.3f}% | "
            f"{100 * r['top1_agreement']:.2f}% |"
        )
    print("\n".join(lines))
    return rows


# ---- main ------------------------------------------------------------------------------------------
def make_weights(directory: Path, n_layer: int = 12) -> None:
    """A random GPT-2 124M in Hugging Face format, plus GPT-2's tokenizer files when the fixture is
    there (the timings need none: every engine is fed token ids; see convert_ctranslate2)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=n_layer)).save_pretrained(directory, safe_serialization=True)
    bpe = Path(__file__).resolve().parents[2] / "shared/fixtures/gpt2-bpe"
    if (bpe / "encoder.json").is_file():
        (directory / "vocab.json").write_bytes((bpe / "encoder.json").read_bytes())
        (directory / "merges.txt").write_bytes((bpe / "vocab.bpe").read_bytes())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for every engine")
    p.add_argument("--runs", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--max-seconds", type=float, default=120, help="fewer runs for configurations slower than this")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="the larger batch size")
    p.add_argument("--prefill", type=int, default=1024, help="prefill length (0 to skip)")
    p.add_argument("--compile", action="store_true", help="also time gptlab with torch.compile'd decoding")
    p.add_argument("--quick", action="store_true", help="1 run, 32 new tokens, 256 prefill")
    p.add_argument("--layers", type=int, default=12, help="fewer blocks for a smoke test (GPT-2 124M: 12)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--plot", default=None, metavar="FILE", help="also draw them as a PNG bar chart")
    p.add_argument(
        "--in-process", action="store_true",
        help="time all engines in one process (default: one process per engine; see the module docstring)",
    )
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)  # a worker: the parent's HF directory
    p.add_argument("--quality", action="store_true", help="also: perplexity at each precision")
    p.add_argument("--quality-only", action="store_true", help="only the perplexity comparison")
    p.add_argument("--quality-checkpoint", default=None, help="trained checkpoint (default: the random weights)")
    p.add_argument("--quality-data", default=None, help="held-out text file or .bin token shard")
    args = p.parse_args(argv)
    if args.plot and not args.plot.lower().endswith(".png"):
        p.error(f"--plot {args.plot}: the chart is a PNG; give a file name ending in .png")
    if args.quick:
        args.runs, args.new_tokens, args.prefill = 1, 32, 256
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.weights:
            (work / "hf").symlink_to(Path(args.weights).resolve())
        elif not (args.quality_only and args.quality_checkpoint):
            make_weights(work / "hf", args.layers)
        if not args.quality_only:
            if args.in_process or len(args.engines) == 1:
                speed(work, args)
            else:
                speed_isolated(work, args)
        if args.quality or args.quality_only:
            checkpoint = Path(args.quality_checkpoint) if args.quality_checkpoint else work / "hf"
            print()
            quality(checkpoint, Path(args.quality_data) if args.quality_data else None)
    return 0


def speed_isolated(work: Path, args: argparse.Namespace) -> list[dict]:
    """`speed` for one engine at a time, each in a fresh process on the same weights; one table."""
    import subprocess

    # The machine's bandwidth drifts (neighbours): every worker measures it before each timed batch-1
    # round and bounds that round by it; the table's figure is the median of all the measurements.
    results, measured = [], []
    for engine in args.engines:
        out = work / f"{engine}.json"
        cmd = [sys.executable, __file__, "--engines", engine, "--precisions", *args.precisions]
        cmd += ["--weights", str(work / "hf"), "--json", str(out)]
        for flag in ("threads", "runs", "max_seconds", "new_tokens", "prompt_tokens", "batch", "prefill", "layers"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cmd += ["--compile"] if args.compile else []
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        worker = json.loads(out.read_text())
        results += worker["results"]
        measured += worker["bandwidth_measured"]
    bandwidth = statistics.median(measured)
    print(f"memory read bandwidth GB/s: {' '.join(f'{b:.1f}' for b in measured)}", file=sys.stderr)
    order = {(e, p): i for i, (p, e) in enumerate((p, e) for p in args.precisions for e in args.engines)}
    results.sort(key=lambda r: order.get((r["engine"].split("+")[0], r["precision"]), len(order)))
    return report(results, bandwidth, args, measured)


def speed(work: Path, args: argparse.Namespace) -> list[dict]:
    """Time every engine x precision x workload; print the markdown table."""
    from gptlab.checkpoint import load_model

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 50000, (args.batch, args.prompt_tokens), generator=gen).tolist()
    long_prompt = torch.randint(0, 50000, (max(args.prefill - 1, 1),), generator=gen).tolist()
    hf_dir = work / "hf"
    config = load_model(hf_dir).config
    variants = []  # (engine label, precision, workloads)
    for precision in args.precisions:
        for engine in args.engines:
            if engine == "gptlab":
                variants.append(("gptlab", precision, gptlab_engine(hf_dir, precision, False)))
                if args.compile and precision != "int8":  # fbgemm's int8 kernels cannot be compiled
                    variants.append(("gptlab+compile", precision, gptlab_engine(hf_dir, precision, True)))
            elif engine == "gptlab-torch":  # gptlab without its C kernels: torch's matmuls only
                variants.append(("gptlab-torch", precision, gptlab_engine(hf_dir, precision, False, kernels=False)))
            elif engine == "transformers":
                variants.append(("transformers", precision, transformers_engine(hf_dir, precision)))
            else:
                ct2 = ctranslate2_engine(hf_dir, precision, work, args.threads)
                variants.append(("ctranslate2", precision, ct2))
    variants = [v for v in variants if v[2] is not None]

    jobs = []  # (label, precision, workload name, callable)
    for label, precision, w in variants:
        jobs.append((label, precision, "b1", w["decode"](prompts[:1], args.new_tokens)))
        jobs.append((label, precision, f"b{args.batch}", w["decode"](prompts, args.new_tokens)))
        if args.prefill:
            jobs.append((label, precision, "prefill", w["prefill"](long_prompt)))
    rates: dict[tuple[str, str, str], list[float]] = {}
    budget: dict[int, int] = {}  # job -> timed runs; very slow configurations get fewer
    # The bound of each timed batch-1 round: the bandwidth measured just before it (it drifts within
    # seconds with the machine's neighbours), so each round is set against the machine it ran on.
    paired: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (label, precision) -> (GB/s, tok/s)
    for r in range(args.runs + 1):  # run 0 warms up (and compiles)
        for j, (label, precision, name, fn) in enumerate(jobs):
            if r > budget.get(j, args.runs):
                continue
            gbs = measure_bandwidth() if r and name == "b1" else None
            t = time.perf_counter()
            tokens = fn()
            seconds = time.perf_counter() - t
            if r == 0:
                budget[j] = max(1, min(args.runs, int(args.max_seconds / max(seconds, 1e-9))))
            else:
                rates.setdefault((label, precision, name), []).append(tokens / seconds)
                if gbs is not None:
                    paired.setdefault((label, precision), []).append((gbs, tokens / seconds))
            line = f"run {r} {label:15s} {precision} {name:8s} {tokens / seconds:8.1f} tok/s"
            print(line, file=sys.stderr, flush=True)

    measured = [gbs for pairs in paired.values() for gbs, _ in pairs]
    bandwidth = statistics.median(measured)
    results = []
    for label, precision, _ in variants:
        med = {n: statistics.median(v) for (e, p, n), v in rates.items() if (e, p) == (label, precision)}
        pairs = paired[label, precision]
        per_token = weight_bytes_per_token(config, precision)
        frac = statistics.median(rate / (gbs * 1e9 / per_token) for gbs, rate in pairs)
        own = statistics.median(gbs for gbs, _ in pairs)
        results.append(
            dict(
                engine=label, precision=precision, **med, bound_b1=own * 1e9 / per_token, frac_b1=frac,
                bandwidth=own, rounds_b1=[dict(gbs=gbs, tok_s=rate) for gbs, rate in pairs],
            )
        )  # fmt: skip
    print(f"memory read bandwidth {bandwidth:.1f} GB/s", file=sys.stderr)
    return report(results, bandwidth, args, measured)


def report(results: list[dict], bandwidth: float, args: argparse.Namespace, measured: list[float]) -> list[dict]:
    """Print the table; with --json also write the results (a worker's output to its parent)."""
    print(markdown(results, args.batch, bandwidth, args))
    if args.json:
        summary = dict(bandwidth_gbs=bandwidth, bandwidth_measured=measured, threads=args.threads, results=results)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if getattr(args, "plot", None):
        print(f"wrote {plot(results, args.batch, args.layers, args.plot)}", file=sys.stderr)
    return results


def plot(results: list[dict], batch: int, layers: int, path: str | Path) -> Path:
    """Tokens/s per engine and precision, batch 1 (with each precision's bandwidth bound as a line)
    and batch `batch`, side by side, as a PNG."""
    from gptlab.reports.plots import _figure, _save

    precisions = [p for p in BYTES if any(r["precision"] == p for r in results)]
    engines = list(dict.fromkeys(r["engine"] for r in results))
    by = {(r["engine"], r["precision"]): r for r in results}
    fig = _figure(figsize=(11, 4.2), layout="constrained")
    width = 0.8 / len(engines)
    for ax, key, title in zip(fig.subplots(1, 2), ("b1", f"b{batch}"), ("batch 1", f"batch {batch}"), strict=True):
        for i, engine in enumerate(engines):
            xs = [j + (i - (len(engines) - 1) / 2) * width for j in range(len(precisions))]
            ys = [(by.get((engine, p)) or {}).get(key) or 0 for p in precisions]
            ax.bar(xs, ys, width, label=engine)
        if key == "b1":
            for j, p in enumerate(precisions):
                bounds = [r["bound_b1"] for r in results if r["precision"] == p and r.get("bound_b1")]
                if bounds:
                    ax.hlines(statistics.median(bounds), j - 0.45, j + 0.45, colors="black", linestyles="dashed")
        ax.set_xticks(range(len(precisions)), precisions)
        ax.set_ylabel("tokens/s")
        ax.set_title(title + (" (dashed: bandwidth bound)" if key == "b1" else ""))
    fig.axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"GPT-2 124M ({layers} layers) decoding on CPU (benchmarks/decode.py)")
    return _save(fig, path)


def markdown(results: list[dict], batch: int, bandwidth: float, args: argparse.Namespace) -> str:
    ref = {r["precision"]: r for r in results if r["engine"] == "transformers"}
    ref_fp32 = ref.get("fp32")
    bn = f"b{batch}"
    lines = [
        f"GPT-2 124M ({args.layers} layers), {args.prompt_tokens}-token prompt + {args.new_tokens} greedy "
        "tokens; prefill = "
        f"{args.prefill - 1}-token prompt to first token; {args.threads} threads; "
        f"median of {args.runs} runs; read bandwidth {bandwidth:.1f} GB/s (median). Each batch-1 round is set "
        "against the bandwidth measured just before it; the % is the median of those rounds' fractions, "
        "the bound in brackets the one at their median bandwidth.",
        "",
        f"| engine | precision | b1 tok/s | {bn} tok/s | prefill tok/s "
        f"| b1 % of bandwidth bound (bound tok/s at the bandwidth) | b1 / {bn} vs transformers |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base = ref.get(r["precision"]) or ref_fp32
        if base is not None and r["engine"] != "transformers":
            tag = "" if base["precision"] == r["precision"] else f" (vs {base['precision']})"
            vs = f"{r['b1'] / base['b1']:.2f}x / {r[bn] / base[bn]:.2f}x{tag}"
        else:
            vs = "-"
        prefill = f"{r['prefill']:.0f}" if "prefill" in r else "-"
        lines.append(
            f"| {r['engine']} | {r['precision']} | {r['b1']:.1f} | {r[bn]:.1f} | {prefill} | "
            f"{100 * r['frac_b1']:.0f}% ({r['bound_b1']:.0f} at {r['bandwidth']:.1f} GB/s) | {vs} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
