"""`gptlab train` with no arguments: the whole recipe, offline, in minutes on a laptop CPU.

1. tokenizer: a 4096-id byte-level BPE trained on part of the Python standard library (cached)
2. data:      the whole standard library tokenized into shards (gptlab.data.prepare, cached)
3. model:     the `nano` preset, trained for `time_limit` minutes (the step count is set from a
              measured step time, so the cosine schedule ends where the time does)
4. sample:    a continuation of "def " from the trained model
Caches live under data/stdlib/ (tokenizer/, dataset/); a second run reuses them.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gptlab.train import distributed as D
from gptlab.train.config import DataSection, ModelSection, OptimSection, TrainConfig, TrainSection
from gptlab.train.loop import TrainResult

DATA_DIR = Path("data/stdlib")
VOCAB_SIZE = 4096
TOKENIZER_TRAIN_BYTES = 4 << 20  # a third of the library: the merges settle well before all of it
DEFAULT_TIME_LIMIT = 6.0  # minutes of training; tokenizer + data + sample add about a minute on 2 cores


def default_config(data_dir: Path = DATA_DIR) -> TrainConfig:
    """The main job's recipe, sized for a 2-core CPU: nano (4 x 128, ~1.3M parameters), context 256."""
    return TrainConfig(
        model=ModelSection(preset="nano"),
        data=DataSection(dataset=str(data_dir / "dataset"), tokenizer=str(data_dir / "tokenizer")),
        # Tuned at equal wall time on 2 cores: in a few hundred steps, more and smaller steps win
        # (8 x 256 tokens at 3e-3 reached val loss 4.9 where 16 x 256 at 2e-3 reached 5.7).
        optim=OptimSection(lr=3e-3, warmup_steps=20, weight_decay=0.1),
        train=TrainSection(
            batch_size=8,
            max_steps=10_000,
            eval_interval=50,
            eval_batches=8,
            log_interval=5,
            checkpoint_interval=100,
            keep_checkpoints=2,
        ),
    )


def ensure_tokenizer(
    data_dir: Path, vocab_size: int = VOCAB_SIZE, corpus: list[Path] | None = None, progress: bool = True
) -> Any:
    """The cached tokenizer under data_dir/tokenizer, trained first if absent."""
    from gptlab.checkpoint import atomic_dir
    from gptlab.data.documents import default_corpus_files
    from gptlab.tokenizer import Tokenizer

    out = data_dir / "tokenizer"
    if out.is_dir() and any(out.iterdir()):
        tok = Tokenizer.from_pretrained(out)
        print(f"tokenizer: reusing {out} ({tok.vocab_size} ids)", flush=True)
        return tok
    files = list(corpus or default_corpus_files())
    random.Random(0).shuffle(files)  # a sample of the whole library, not just its first packages
    chosen, size = [], 0
    for f in files:
        if size >= TOKENIZER_TRAIN_BYTES:
            break
        chosen.append(f)
        size += f.stat().st_size
    began = time.perf_counter()
    print(f"tokenizer: training a {vocab_size}-id BPE on {len(chosen)} files ({size / 1e6:.1f} MB)", flush=True)
    tok = Tokenizer.train(chosen, vocab_size, show_progress=progress)
    with atomic_dir(out) as tmp:
        tok.save(tmp)
    print(f"tokenizer: saved to {out} in {time.perf_counter() - began:.0f} s", flush=True)
    return Tokenizer.from_pretrained(out)


def ensure_dataset(data_dir: Path, tokenizer: Any, corpus: list[Path] | None = None, progress: bool = True) -> Path:
    """The cached token dataset under data_dir/dataset, prepared first if absent or stale."""
    from gptlab.data.loader import read_manifest
    from gptlab.data.prepare import prepare, summary

    out = data_dir / "dataset"
    from gptlab.data.documents import default_corpus_files

    wanted = sorted({str(f) for f in (corpus or default_corpus_files())})
    try:
        manifest = read_manifest(out)
        # Stale when the tokenizer or the corpus changed (a newer gptlab leaves out more of the stdlib).
        same_files = sorted(set(manifest.get("sources", {}).get("files") or [])) == wanted
        if manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint() and same_files:
            print(f"data: reusing {out} ({manifest['tokens']:,} tokens)", flush=True)
            return out
    except (FileNotFoundError, ValueError):
        pass
    began = time.perf_counter()
    manifest = prepare(corpus, out, tokenizer, val_fraction=0.02, seed=0, progress=progress)
    print(summary(manifest, out), flush=True)
    print(f"data: prepared in {time.perf_counter() - began:.0f} s", flush=True)
    return out


def measure_step_seconds(cfg: TrainConfig, repeats: int = 3) -> float:
    """Median seconds of one optimizer step of `cfg` (resolved) on random tokens."""
    from gptlab.train.evaluate import autocast, resolve_dtype
    from gptlab.train.optim import build_optimizer
    from gptlab.train.pretrain import build_model

    device = D.pick_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    config = cfg.model.resolve()
    model = build_model(config, cfg.train.seed).to(device)
    if cfg.train.fused_loss:
        from gptlab.train.losses import apply_fused_cross_entropy

        apply_fused_cross_entropy(model)
    opt = build_optimizer(model, model.named_parameters(), cfg.optim, device)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    times = []
    for _ in range(repeats + 1):
        began = time.perf_counter()
        for start in range(0, cfg.train.batch_size, micro):
            n = min(micro, cfg.train.batch_size - start)
            x = torch.randint(0, config.vocab_size, (n, cfg.data.seq_len), device=device)
            with autocast(device, dtype):
                _, loss = model(x, x)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    torch.set_num_threads(threads)
    return statistics.median(times[1:])


def fastest_threads(cfg: TrainConfig) -> tuple[int, float]:
    """(threads, seconds per step) for 1 or all CPU threads, whichever steps faster now: on a busy
    machine (shared runners, other jobs) a multi-threaded step waits on its slowest thread and can run
    several times slower than one."""
    most = torch.get_num_threads()
    timed = {
        n: measure_step_seconds(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=n)))
        for n in ((most, 1) if most > 1 else (most,))
    }
    best = min(timed, key=timed.get)
    return best, timed[best]


def main_job(
    time_limit: float | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    data_dir: str | Path = DATA_DIR,
    run_dir: str | Path | None = None,
    corpus: list[Path] | None = None,
    vocab_size: int = VOCAB_SIZE,
    sample_tokens: int = 120,
    progress: bool = True,
) -> TrainResult:
    """Tokenizer -> data -> train for `time_limit` minutes -> sample. `overrides` ({'model.n_layer': 2}
    or ['--model.n_layer', '2']) adjust the default recipe; `corpus` replaces the standard library."""
    from gptlab.train.pretrain import pretrain, resolve

    time_limit = DEFAULT_TIME_LIMIT if time_limit is None else time_limit
    if time_limit <= 0:
        raise ValueError(f"--time-limit must be a positive number of minutes, got {time_limit}")
    data_dir = Path(data_dir)
    started = time.perf_counter()
    d = D.init_distributed()
    try:
        if d.is_main:  # the other ranks wait for the caches rather than racing to build them
            tokenizer = ensure_tokenizer(data_dir, vocab_size, corpus, progress)
            ensure_dataset(data_dir, tokenizer, corpus, progress)
        D.barrier(d)
        cfg = default_config(data_dir)
        if overrides:
            cfg = load_train_config_from(cfg, overrides)
        if run_dir is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(run_dir)))
        cfg = resolve(cfg)
        # Size the run to the time, so the cosine schedule finishes rather than being cut off mid-decay
        # (unless the caller fixed train.max_steps; the time limit still applies).
        measured = None
        if not d.enabled and cfg.train.threads is None and D.pick_device(cfg.train.device).type == "cpu":
            threads, measured = fastest_threads(cfg)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=threads))
        if _given(overrides, "train.max_steps"):
            steps, step_s = cfg.train.max_steps, None
        else:
            step_s = measured or D.broadcast_object(d, measure_step_seconds(cfg) if d.is_main else None)
            steps = max(10, int(0.92 * time_limit * 60 / step_s))
        warmup = cfg.optim.warmup_steps
        if not _given(overrides, "optim.warmup_steps"):
            warmup = min(warmup, max(1, steps // 10))
        cfg = dataclasses.replace(
            cfg,
            train=dataclasses.replace(cfg.train, max_steps=steps, time_limit=time_limit),
            optim=dataclasses.replace(cfg.optim, warmup_steps=warmup),
        )
        if d.is_main:
            each = f" (~{step_s:.2f} s each, {cfg.train.threads or torch.get_num_threads()} threads)" if step_s else ""
            print(
                f"train: {steps} steps of {cfg.train.batch_size} x {cfg.data.seq_len} tokens{each} "
                f"within {time_limit:g} min",
                flush=True,
            )
        result = pretrain(cfg, dist=d)
        if d.is_main:
            print_sample(result.run_dir, sample_tokens)
            total = time.perf_counter() - started
            print(
                f"\ndone in {total / 60:.1f} min: run directory {result.run_dir} "
                f"(loss {result.loss:.3f}" + (f", val loss {result.val_loss:.3f})" if result.val_loss else ")")
            )
            if result.val_loss is not None:
                print(
                    f"validation: loss {result.val_loss:.3f}, perplexity {math.exp(result.val_loss):.1f} on held-out "
                    f"modules; {result.tokens:,} tokens seen in {result.step} steps"
                )
            print(f"continue with: gptlab generate {result.run_dir} 'def '")
            print(f"               gptlab report {result.run_dir}")
            print(f"               gptlab train --resume {result.run_dir} --train.max_steps {steps * 2}")
        return result
    finally:
        D.shutdown(d)


def _given(overrides: Any, key: str) -> bool:
    if not overrides:
        return False
    if isinstance(overrides, list):
        return any(a.lstrip("-").split("=")[0].replace("-", "_") == key for a in overrides)
    return key in overrides


def load_train_config_from(cfg: TrainConfig, overrides: dict[str, Any] | list[str]) -> TrainConfig:
    from gptlab.config import apply_overrides, parse_dotted_args

    if isinstance(overrides, list):
        overrides = parse_dotted_args(overrides)
    return apply_overrides(cfg, overrides)


def print_sample(run_dir: Path, max_new_tokens: int = 120, prompt: str = "def ") -> str:
    """Sample a continuation of `prompt` from the run's newest checkpoint and print it."""
    from gptlab.checkpoint import load_model, load_tokenizer
    from gptlab.infer.generate import generate

    model = load_model(run_dir)
    tokenizer = load_tokenizer(run_dir)
    text = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=0)[0].text
    print(f"\nsample (temperature 0.8, top-k 50):\n{'-' * 60}\n{prompt}{text}\n{'-' * 60}")
    return text


def train_command(
    config: str | None = None,
    overrides: list[str] | None = None,
    resume: bool | str = False,
    time_limit: float | None = None,
    run_dir: str | None = None,
    step: int | None = None,
) -> TrainResult:
    """What `gptlab train` does: the main job without a config, else pretraining from the config.

    `--resume RUN_DIR` continues RUN_DIR with its own config.json (plus overrides, e.g. a larger
    train.max_steps) from its newest checkpoint that reads back intact, or from step `step`; RUN_DIR may
    also be one checkpoint directory of a run. `--resume` with `--config` continues the config's run
    directory.
    """
    from gptlab.train.config import load_train_config
    from gptlab.train.pretrain import config_of_run, pretrain
    from gptlab.train.state import resume_target

    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"--time-limit must be a positive number of minutes, got {time_limit}")
    if run_dir is not None and Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ValueError(f"--run-dir {run_dir} is a file, not a directory; choose another --run-dir")
    if step is not None and not resume:
        raise ValueError("--step N picks the checkpoint to resume from: gptlab train --resume RUN_DIR --step N")
    resume_from: bool | Path = bool(resume)
    if isinstance(resume, str):
        if config is not None:
            raise ValueError("give either --config FILE or --resume RUN_DIR (which brings its own config), not both")
        run, checkpoint = resume_target(Path(resume), step)
        config, run_dir, resume_from = str(config_of_run(run)), str(run), checkpoint or True
    if config is None:
        if resume:
            raise ValueError("--resume needs the run to continue: gptlab train --resume RUN_DIR")
        return main_job(time_limit, overrides, run_dir=run_dir)
    cfg = load_train_config(config, overrides)
    train = cfg.train
    if time_limit is not None:
        train = dataclasses.replace(train, time_limit=time_limit)
    if run_dir is not None:
        train = dataclasses.replace(train, run_dir=str(run_dir))
    if step is not None and resume_from is True:  # --resume --step N with --config
        if train.run_dir is None:
            raise ValueError("--step N needs the run directory: set train.run_dir, or pass --resume RUN_DIR")
        _, resume_from = resume_target(Path(train.run_dir), step)
    return pretrain(dataclasses.replace(cfg, train=train), resume=resume_from)
