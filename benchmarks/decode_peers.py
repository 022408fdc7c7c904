"""Decoding speed of the exported model in its deployment runtimes: llama.cpp and onnxruntime.

The same GPT-2 124M weights (random: speed does not depend on their values) are exported with
`gptlab export` to GGUF (f32 and q8_0) and to ONNX, then decoded greedily: a `prompt_len`-token
prompt, then `new_tokens` new tokens; tokens/s counts the new tokens over the whole call, prefill
included, as benchmarks/decode.py does for gptlab and transformers.

llama.cpp runs through llama-cpp-python, whose `Llama` object decodes one sequence: only batch 1 is
measured (batched decoding needs llama.cpp's C batch API with one sequence id per row).
onnxruntime runs the export's `model.onnx` with gptlab's `OnnxDecoder` (numpy past tensors fed back each
step, no IO binding), at any batch size.

    python benchmarks/decode_peers.py                    # table: gptlab, llama.cpp f32 / q8_0, onnxruntime
    python benchmarks/decode_peers.py --quick --layers 2 # smoke test
    python benchmarks/decode_peers.py --model DIR        # a trained checkpoint or Hugging Face GPT-2 dir

benchmarks/decode.py imports `llamacpp_decode_tps` and `onnxruntime_decode_tps`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_EXPORT_ROOT = Path(tempfile.gettempdir()) / "gptlab-decode-peers"


def _export_dir(model_dir: str | Path, what: str) -> Path:
    """A per-model cache directory for exports (keyed by the weights file's size and mtime)."""
    model_dir = Path(model_dir).resolve()
    stamp = "".join(f"{p.name}{p.stat().st_size}{p.stat().st_mtime_ns}" for p in sorted(model_dir.glob("*")))
    key = hashlib.sha256(f"{model_dir}|{stamp}".encode()).hexdigest()[:16]
    return _EXPORT_ROOT / key / what


def _prompts(batch: int, prompt_len: int, vocab: int = 50000) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(batch)]


def _median_rate(fn: Callable[[], int], runs: int) -> float:
    fn()  # warm-up: allocations, thread pools
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - t))
    return statistics.median(rates)


def gguf_file(model_dir: str | Path, dtype: str) -> Path:
    """The model exported to GGUF (cached)."""
    from gptlab.interop.gguf import export_gguf

    file = _export_dir(model_dir, "gguf") / f"model-{dtype}.gguf"
    if not file.is_file():
        export_gguf(model_dir, file, dtype=dtype)
    return file


def onnx_dir(model_dir: str | Path) -> Path:
    """The model exported to ONNX (cached)."""
    from gptlab.interop.onnx import export_checkpoint_onnx

    out = _export_dir(model_dir, "onnx")
    from gptlab.interop.onnx_runtime import is_onnx_export

    if not is_onnx_export(out) or "position_ids" not in (out / "export.json").read_text():  # older layout
        export_checkpoint_onnx(model_dir, out)
    return out


def llamacpp_decode_tps(
    model_dir: str | Path,
    batch: int = 1,
    prompt_len: int = 32,
    new_tokens: int = 128,
    dtype: str = "f32",
    *,
    threads: int | None = None,
    runs: int = 3,
) -> float:
    """Greedy decoding tokens/s of llama.cpp (llama-cpp-python) on the model exported to GGUF.

    dtype: 'f32', 'f16' or 'q8_0' (also accepts decode.py's 'fp32' / 'int8'). Batch 1 only.
    """
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"llama-cpp-python is not installed ({e}); pip install 'gptlab[llama]'") from None
    if batch != 1:
        raise ValueError(
            f"batch {batch}: llama-cpp-python's Llama decodes one sequence at a time; only batch 1 is measured"
        )
    dtype = {"fp32": "f32", "int8": "q8_0", "fp16": "f16"}.get(dtype, dtype)
    llm = llama_cpp.Llama(
        model_path=str(gguf_file(model_dir, dtype)),
        n_ctx=prompt_len + new_tokens + 1,
        n_batch=max(prompt_len, 1),
        n_threads=threads or os.cpu_count(),
        n_threads_batch=threads or os.cpu_count(),
        verbose=False,
    )
    prompt = _prompts(1, prompt_len, llm.n_vocab())[0]

    def run() -> int:
        llm.reset()
        made = 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            made += 1
            if made == new_tokens:
                break
        return made

    try:
        return _median_rate(run, runs)
    finally:
        llm.close()


def onnxruntime_decode_tps(
    model_dir: str | Path,
    batch: int = 1,
    prompt_len: int = 32,
    new_tokens: int = 128,
    dtype: str = "fp32",
    *,
    threads: int | None = None,
    runs: int = 3,
) -> float:
    """Greedy decoding tokens/s (new tokens x batch) of onnxruntime on the export's `model.onnx`. fp32 only."""
    from gptlab.interop.onnx_runtime import OnnxDecoder

    if dtype not in ("fp32", "f32"):
        raise ValueError(f"the ONNX export is float32; dtype {dtype!r} is not measured")
    decoder = OnnxDecoder(onnx_dir(model_dir), threads=threads)
    prompts = _prompts(batch, prompt_len)

    def run() -> int:
        out = decoder.greedy(prompts, new_tokens)
        return sum(len(o) for o in out)

    return _median_rate(run, runs)


def gptlab_decode_tps(
    model_dir: str | Path, batch: int = 1, prompt_len: int = 32, new_tokens: int = 128, *, runs: int = 3
) -> float:
    """The baseline: gptlab's own greedy decoding (fp32, eager) on the same weights."""
    from gptlab.checkpoint import load_model
    from gptlab.infer.generate import generate_ids

    model = load_model(model_dir)
    prompts = _prompts(batch, prompt_len)

    def run() -> int:
        out = generate_ids(model, prompts, max_new_tokens=new_tokens, temperature=0)
        return sum(len(o) for o in out)

    return _median_rate(run, runs)


def make_model(directory: Path, n_layer: int = 12) -> Path:
    """A random GPT-2 124M (n_layer blocks) gptlab checkpoint with GPT-2's tokenizer (GGUF needs one)."""
    import torch

    from gptlab.checkpoint import save_model
    from gptlab.model import GPT
    from gptlab.presets import preset
    from gptlab.tokenizer import Tokenizer

    bpe = Path(__file__).resolve().parents[2] / "shared/fixtures/gpt2-bpe"
    if not (bpe / "encoder.json").is_file():
        raise FileNotFoundError(f"GPT-2's tokenizer files are needed at {bpe} (encoder.json + vocab.bpe)")
    torch.manual_seed(0)
    model = GPT(preset("gpt2", n_layer=n_layer))
    return save_model(model, directory, tokenizer=Tokenizer.gpt2(bpe))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint or Hugging Face GPT-2 dir (default: random 124M)")
    p.add_argument("--layers", type=int, default=12, help="blocks of the random model (GPT-2 124M: 12)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every engine")
    p.add_argument("--runs", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="the larger batch (llama.cpp: batch 1 only)")
    p.add_argument("--quick", action="store_true", help="1 run, 16 new tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.new_tokens = 1, 16
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_model(Path(tmp) / "model", args.layers)
        shape = dict(prompt_len=args.prompt_tokens, new_tokens=args.new_tokens, runs=args.runs)
        rows: list[tuple[str, str, Callable[[int], float]]] = [
            ("gptlab (torch eager)", "fp32", lambda b: gptlab_decode_tps(model_dir, b, **shape)),
            (
                "llama.cpp",
                "f32",
                lambda b: llamacpp_decode_tps(model_dir, b, dtype="f32", threads=args.threads, **shape),
            ),
            (
                "llama.cpp",
                "q8_0",
                lambda b: llamacpp_decode_tps(model_dir, b, dtype="q8_0", threads=args.threads, **shape),
            ),
            ("onnxruntime", "fp32", lambda b: onnxruntime_decode_tps(model_dir, b, threads=args.threads, **shape)),
        ]
        print(
            f"threads {args.threads}, prompt {args.prompt_tokens}, new tokens {args.new_tokens}, median of {args.runs}",
            file=sys.stderr,
        )
        lines = [f"| engine | weights | batch 1 tok/s | batch {args.batch} tok/s |", "|---|---|---:|---:|"]
        for name, dtype, measure in rows:
            cells = []
            for b in (1, args.batch):
                try:
                    cells.append(f"{measure(b):.1f}")
                except (ImportError, ValueError) as e:
                    print(f"{name} {dtype} batch {b}: {e}", file=sys.stderr)
                    cells.append("n/a")
            lines.append(f"| {name} | {dtype} | {cells[0]} | {cells[1]} |")
            print(lines[-1], file=sys.stderr, flush=True)
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
