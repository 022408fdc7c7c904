"""The main job's corpus curation, measured: the same recipe on the whole standard library and on the
curated default corpus (generated tables and data left out), scored on the same held-out real modules.

Each arm runs `gptlab train`'s own pipeline (gptlab.train.pipeline.main_job): a 4096-id BPE trained on
its corpus, token shards, the nano preset for the same number of steps of 8 x 256 tokens. The two
tokenizers differ, so the held-out score is bits per byte (gptlab.eval.perplexity), which does not
depend on the tokenizer. The held-out modules are left out of both corpora.

    flock /tmp/gptlab-heavy.lock python benchmarks/corpus_curation.py --steps 1500
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

# Hand-written modules of several styles (text processing, data structures, CLI parsing, numerics),
# none a table; every one is kept by the curation, and left out of both training corpora here.
HELD_OUT = (
    "argparse.py",
    "bisect.py",
    "calendar.py",
    "csv.py",
    "difflib.py",
    "fnmatch.py",
    "glob.py",
    "heapq.py",
    "pprint.py",
    "queue.py",
    "shlex.py",
    "statistics.py",
    "string.py",
    "textwrap.py",
)


def corpora() -> tuple[list[Path], list[Path], list[Path]]:
    """(uncurated, curated, held out): the stdlib's .py files with and without the curation's exclusions."""
    from gptlab.data.documents import corpus_exclusion, default_corpus_files, default_corpus_left_out

    root = Path(sysconfig.get_paths()["stdlib"])
    held_out = [root / name for name in HELD_OUT]
    assert all(f.is_file() and corpus_exclusion(f) is None for f in held_out)
    curated = [f for f in default_corpus_files() if f not in held_out]
    left_out = [root / p for entry in default_corpus_left_out().values() for p in entry["paths"]]
    uncurated = sorted(curated + left_out, key=str)
    return uncurated, curated, held_out


def run_arm(name: str, corpus: list[Path], held_out: list[Path], steps: int, seed: int, work: Path) -> dict:
    from gptlab.checkpoint import load_model, load_tokenizer
    from gptlab.eval.perplexity import perplexity
    from gptlab.train.pipeline import main_job

    began = time.perf_counter()
    overrides = {"train.max_steps": steps, "train.seed": seed, "train.loggers": [], "train.progress": False}
    data_dir, run_dir = work / name / "data", work / name / f"run-{seed}"
    result = main_job(60.0, overrides, data_dir=data_dir, run_dir=run_dir, corpus=corpus, progress=False)
    model, tok = load_model(result.run_dir), load_tokenizer(result.run_dir)
    texts = [f.read_text(encoding="utf-8") for f in held_out]
    # Disjoint 256-token windows, end-of-text before each module: the training setting.
    score = perplexity(model, tok, texts, stride=model.config.n_ctx)
    return {
        "corpus": name,
        "files": len(corpus),
        "corpus_mb": sum(f.stat().st_size for f in corpus) / 1e6,
        "seed": seed,
        "steps": result.step,
        "tokens_seen": result.tokens,
        "held_out_bits_per_byte": score.bits_per_byte,
        "held_out_tokens": score.tokens,
        "held_out_loss_per_token": score.nll,
        "own_val_loss": result.val_loss,
        "minutes": (time.perf_counter() - began) / 60,
    }


def main() -> None:
    from gptlab.reports.run_report import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per arm (8 x 256 tokens each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337], help="training seeds (one run per arm each)")
    parser.add_argument("--work", type=Path, default=None, help="where the arms' data and runs go (default: temp)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    uncurated, curated, held_out = corpora()
    held_bytes = sum(f.stat().st_size for f in held_out)
    print(f"held out: {len(held_out)} modules, {held_bytes / 1e3:.0f} KB; CPU: {cpu_name()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for seed in args.seeds:
            for name, corpus in (("uncurated", uncurated), ("curated", curated)):
                rows.append(run_arm(name, corpus, held_out, args.steps, seed, work))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| corpus | files | MB | seed | tokens seen | held-out bits/byte | own val loss | minutes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['corpus']} | {r['files']} | {r['corpus_mb']:.1f} | {r['seed']} | {r['tokens_seen']:,} | "
            f"{r['held_out_bits_per_byte']:.4f} | {r['own_val_loss']:.3f} | {r['minutes']:.1f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
