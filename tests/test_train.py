"""The training loop on tiny models: schedule, optimizer groups, config, exact resume, atomic
checkpoints, non-finite steps, accumulation / activation checkpointing / bf16, the CLI and the main job."""

from __future__ import annotations

import dataclasses
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import list_checkpoints, load_model
from gptlab.train.config import TrainConfig, load_train_config
from gptlab.train.loop import NonFiniteLossError
from gptlab.train.schedule import batch_size_at, lr_at

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = [
    "textwrap.py",
    "string.py",
    "shlex.py",
    "fnmatch.py",
    "glob.py",
    "bisect.py",
    "heapq.py",
    "colorsys.py",
]


def make_dataset(root: Path) -> tuple[Path, Path]:
    """A 300-id BPE and ~40k tokens of standard-library code: (dataset dir, tokenizer dir)."""
    from gptlab.data.prepare import prepare
    from gptlab.tokenizer import Tokenizer

    files = [STDLIB / n for n in CORPUS]
    tok = Tokenizer.train(files, 300, show_progress=False)
    tok.save(root / "tok")
    prepare(files, root / "ds", tok, val_fraction=0.25, progress=False)
    return root / "ds", root / "tok"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("data"))


def tiny_config(dataset: tuple[Path, Path], run_dir: Path, **overrides) -> TrainConfig:
    ds, tok = dataset
    base = {
        "model.preset": "nano",
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.n_ctx": 64,
        "data.dataset": str(ds),
        "data.tokenizer": str(tok),
        "data.seq_len": 32,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 4,
        "train.batch_size": 4,
        "train.max_steps": 10,
        "train.eval_interval": 5,
        "train.eval_batches": 2,
        "train.log_interval": 1,
        "train.checkpoint_interval": 0,
        "train.tensorboard": False,
        "train.progress": False,
        "train.run_dir": str(run_dir),
        "train.dtype": "float32",
        "train.threads": 1,  # tiny matrices: one thread is faster, and immune to a busy machine
    }
    base.update(overrides)
    return load_train_config(None, base)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


# ---- schedule, optimizer, config ----------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    peak, warm, total = 6e-4, 10, 110
    assert lr_at(0, peak, warm, total) == pytest.approx(peak / 10)
    assert lr_at(9, peak, warm, total) == pytest.approx(peak)
    assert lr_at(10, peak, warm, total) == pytest.approx(peak)
    assert lr_at(60, peak, warm, total) == pytest.approx(0.55 * peak)  # cosine midpoint
    assert lr_at(110, peak, warm, total) == pytest.approx(0.1 * peak)
    assert lr_at(500, peak, warm, total) == pytest.approx(0.1 * peak)
    values = [lr_at(s, peak, warm, total) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_batch_ramp_is_linear_in_tokens_and_rounds_to_world_size():
    assert batch_size_at(0, 64, 8, 1000) == 8
    assert batch_size_at(500, 64, 8, 1000) == 36
    assert batch_size_at(1000, 64, 8, 1000) == 64
    assert batch_size_at(500, 64, 8, 1000, multiple=8) == 32
    assert batch_size_at(0, 64, 1, 1000, multiple=4) == 4
    assert batch_size_at(10, 64, 8, 0) == 64
    with pytest.raises(ValueError, match="multiple of the world size"):
        batch_size_at(0, 30, 1, 0, multiple=4)


@pytest.mark.parametrize("tied", [True, False])
def test_weight_decay_only_on_matrices(tied: bool):
    from gptlab.config import ModelConfig
    from gptlab.model import GPT
    from gptlab.train.config import OptimSection
    from gptlab.train.optim import build_optimizer

    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, n_ctx=8, vocab_size=50, tie_embeddings=tied))
    opt = build_optimizer(model, model.named_parameters(), OptimSection(), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    expected = {n for n in names.values() if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))}
    if not tied:
        expected.add("lm_head.weight")
    assert decayed == expected
    assert opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names)


def test_config_from_toml_and_yaml_with_overrides(tmp_path: Path):
    (tmp_path / "a.toml").write_text(
        '[model]\npreset = "micro"\nn_layer = 3\n[optim]\nlr = 1e-3\n[train]\nbatch_size = 12\ndtype = "bfloat16"\n'
    )
    (tmp_path / "a.yaml").write_text(
        "model:\n  preset: micro\n  n_layer: 3\noptim:\n  lr: 0.001\ntrain:\n  batch_size: 12\n  dtype: bfloat16\n"
    )
    a = load_train_config(tmp_path / "a.toml")
    b = load_train_config(tmp_path / "a.yaml")
    assert a == b
    assert a.model.resolve().n_layer == 3 and a.model.resolve().n_embd == 384  # preset + override
    c = load_train_config(tmp_path / "a.toml", ["--model.n_layer", "6", "--train.compile=true"])
    assert c.model.n_layer == 6 and c.train.compile is True and c.optim.lr == 1e-3
    assert c.optim.beta2 == 0.95 and c.optim.weight_decay == 0.1 and c.optim.grad_clip == 1.0
    with pytest.raises(ValueError, match="n_layr"):
        load_train_config(tmp_path / "a.toml", {"model.n_layr": "2"})
    with pytest.raises(ValueError, match="train.dtype"):
        load_train_config(None, {"train.dtype": "float16"})
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_train_config(tmp_path / "nope.toml")


# ---- the loop -----------------------------------------------------------------------------------
class _Interrupt(Exception):
    pass


class InterruptingTask:
    """Wraps a task and raises when asked for the batch at global index `at` (a simulated crash)."""

    def __init__(self, task, at: int) -> None:
        self.task, self.at = task, at

    def __getattr__(self, name):
        return getattr(self.task, name)

    def batch(self, indices):
        if self.at in indices:
            raise _Interrupt
        return self.task.batch(indices)


def _train(cfg: TrainConfig, resume=False, wrap=None):
    from gptlab.train.loop import train
    from gptlab.train.pretrain import build_model, load_data_tokenizer, resolve
    from gptlab.train.task import LanguageModelingTask

    cfg = resolve(cfg)
    task = LanguageModelingTask(
        cfg.data.dataset, cfg.data.seq_len, eval_batch_size=4, eval_batches=2, fused_loss=cfg.train.fused_loss
    )
    if wrap is not None:
        task = wrap(task)
    model = build_model(cfg.model.resolve(), cfg.train.seed)
    return train(cfg, model, task, cfg.train.run_dir, tokenizer=load_data_tokenizer(cfg), resume=resume)


def test_resume_reproduces_uninterrupted_run_exactly(dataset, tmp_path: Path):
    """A run killed after step 25 and resumed from its step-20 checkpoint logs the same 40 losses
    (and validation losses) as an uninterrupted run: model, optimizer, schedule, data position and
    RNG (dropout is on) all restored."""
    over = {
        "train.max_steps": 40,
        "train.eval_interval": 20,
        "model.dropout": 0.1,
        "train.checkpoint_interval": 10,
        "train.keep_checkpoints": 2,
    }
    full = _train(tiny_config(dataset, tmp_path / "full", **over))
    assert full.step == 40 and full.stop_reason == "max_steps"

    cfg = tiny_config(dataset, tmp_path / "cut", **over)
    with pytest.raises(_Interrupt):
        _train(cfg, wrap=lambda t: InterruptingTask(t, at=25 * 4 + 1))  # inside step 26
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_00000010", "step_00000020"]
    resumed = _train(cfg, resume=True)
    assert resumed.step == 40

    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 41))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6
    assert a[40] < a[1] - 0.5  # it learned something
    val = lambda d: [
        json.loads(x)["val_loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if "val_loss" in json.loads(x)
    ]
    assert val(tmp_path / "full") == pytest.approx(val(tmp_path / "cut"), abs=1e-6)
    # The final weights agree too, and keep-last-2 pruned the older checkpoints.
    wa, wb = load_model(tmp_path / "full").state_dict(), load_model(tmp_path / "cut").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["step_00000030", "step_00000040"]


def test_run_dir_contents_and_config_reproduces(dataset, tmp_path: Path):
    from gptlab.train.pretrain import resolve

    over = {"train.max_steps": 6, "train.eval_interval": 3, "train.tensorboard": True}
    cfg = tiny_config(dataset, tmp_path / "run", **over)
    result = _train(cfg)
    run = tmp_path / "run"
    saved = load_train_config(run / "config.json")
    assert saved == resolve(cfg)  # every model field filled in: the run dir alone reproduces it
    assert saved.model.n_layer == 2 and saved.model.vocab_size == 300 and saved.model.n_head == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "mfu", "elapsed"):
        assert all(r[key] is not None for r in rows), key
    assert rows[-1]["tokens"] == 6 * 4 * 32
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pytest.importorskip("tensorboard")
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert result.checkpoint == run / "checkpoints/step_00000006"
    model = load_model(run)  # the run dir resolves to its newest checkpoint
    assert model.config.n_layer == 2
    from gptlab.checkpoint import load_tokenizer

    assert load_tokenizer(run).vocab_size == 300


def test_gradient_accumulation_and_activation_checkpointing_match_plain(dataset, tmp_path: Path):
    base = {"train.max_steps": 3, "train.eval_interval": 0, "train.batch_size": 6}
    plain = losses(_train(tiny_config(dataset, tmp_path / "a", **base)).run_dir)
    accum = losses(_train(tiny_config(dataset, tmp_path / "b", **base, **{"train.micro_batch_size": 4})).run_dir)
    ckpt = losses(
        _train(tiny_config(dataset, tmp_path / "c", **base, **{"train.activation_checkpointing": True})).run_dir
    )
    for other in (accum, ckpt):
        assert max(abs(plain[s] - other[s]) for s in plain) < 1e-5


def test_validation_batches_span_the_whole_split(dataset):
    from gptlab.data.loader import TokenStream
    from gptlab.train.task import LanguageModelingTask

    task = LanguageModelingTask(dataset[0], 32, eval_batch_size=2, eval_batches=2)
    stream = TokenStream(dataset[0], split="val", seq_len=32)
    n = len(stream)
    batches = task.validation_batches()
    assert [b[0].shape for b in batches] == [(2, 32), (2, 32)]
    rows = torch.cat([b[0] for b in batches])
    expected = stream.chunks([0, n // 4, n // 2, 3 * n // 4])[0]  # evenly spaced, not the first 4
    assert torch.equal(rows, expected) and n > 8


def test_linear_cross_entropy_matches_cross_entropy():
    import torch.nn.functional as F

    from gptlab.train.losses import linear_cross_entropy

    gen = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(2, 37, 16, generator=gen), torch.randn(101, 16, generator=gen)
    t = torch.randint(0, 101, (2, 37), generator=gen)
    t[0, :5] = -1
    results = []
    for fn in (
        lambda h, w: F.cross_entropy(F.linear(h, w).view(-1, 101), t.view(-1), ignore_index=-1),
        lambda h, w: linear_cross_entropy(h, w, t, block=16),
    ):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w)
        (2.5 * loss).backward()
        results.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h0, w0, t), results[0][0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx = linear_cross_entropy(h0, w0, t)
    assert abs(float(approx) - float(results[0][0])) < 0.05


def test_fused_loss_trains_like_the_models_own_loss(dataset, tmp_path: Path):
    base = {"train.max_steps": 3, "train.eval_interval": 3}
    fused = losses(_train(tiny_config(dataset, tmp_path / "a", **base)).run_dir)
    plain = losses(_train(tiny_config(dataset, tmp_path / "b", **base, **{"train.fused_loss": False})).run_dir)
    assert max(abs(fused[s] - plain[s]) for s in plain) < 1e-5


def test_bf16_autocast_trains_on_cpu(dataset, tmp_path: Path):
    base = {"train.max_steps": 4, "train.eval_interval": 0}
    fp32 = losses(_train(tiny_config(dataset, tmp_path / "a", **base)).run_dir)
    bf16 = losses(_train(tiny_config(dataset, tmp_path / "b", **base, **{"train.dtype": "bfloat16"})).run_dir)
    assert all(math.isfinite(v) for v in bf16.values())
    assert abs(bf16[1] - fp32[1]) / fp32[1] < 0.02
    assert bf16[1] != fp32[1]  # autocast really ran in bf16


class NaNTask:
    """Returns a NaN loss for the batches whose first index is in `bad`."""

    def __init__(self, task, bad) -> None:
        self.task, self.bad = task, set(bad)

    def __getattr__(self, name):
        return getattr(self.task, name)

    def batch(self, indices):
        x, y = self.task.batch(indices)
        return x, y, torch.tensor(indices[0] in self.bad)

    def loss(self, model, batch):
        x, y, bad = batch
        loss = self.task.loss(model, (x, y))
        return loss * float("nan") if bool(bad) else loss

    def tokens(self, batch):
        return batch[0].numel()


def test_nonfinite_steps_are_skipped_then_training_stops(dataset, tmp_path: Path, capsys):
    # One bad batch (step 3) is skipped and training goes on; from step 7 on every batch is bad.
    over = {
        "train.max_steps": 12,
        "train.eval_interval": 0,
        "train.checkpoint_interval": 5,
        "train.max_nonfinite_steps": 3,
    }
    cfg = tiny_config(dataset, tmp_path / "run", **over)
    bad = [2 * 4] + [s * 4 for s in range(6, 12)]
    with pytest.raises(NonFiniteLossError) as info:
        _train(cfg, wrap=lambda t: NaNTask(t, bad))
    message = str(info.value)
    assert "3 steps in a row" in message and "steps 7-9" in message and "step_00000005" in message
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [3, 7, 8, 9]
    assert all(math.isfinite(r["loss"]) for r in rows if not r.get("skipped"))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000005"]
    assert "non-finite loss; step skipped" in capsys.readouterr().out
    # A skipped step leaves the weights alone: the checkpoint is a good model.
    model = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(dataset, tmp_path: Path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def failing_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # second checkpoint: model weights written, then a crash before the state
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    cfg = tiny_config(
        dataset,
        tmp_path / "run",
        **{"train.max_steps": 8, "train.checkpoint_interval": 4, "train.eval_interval": 0},
    )
    with pytest.raises(OSError, match="disk full"):
        _train(cfg)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    ckpts = tmp_path / "run/checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step_00000004"]  # no half-written step_00000008
    assert load_model(tmp_path / "run").config.n_layer == 2
    resumed = _train(cfg, resume=True)  # the intact checkpoint resumes
    assert resumed.step == 8 and sorted(losses(tmp_path / "run")) == list(range(1, 9))


# ---- CLI and the main job -----------------------------------------------------------------------
def test_cli_train_with_config_overrides_and_resume(dataset, tmp_path: Path, capsys):
    from gptlab.cli import main

    ds, tok = dataset
    config = tmp_path / "tiny.toml"
    config.write_text(
        f'[model]\npreset = "nano"\nn_layer = 2\nn_head = 2\nn_embd = 32\nn_ctx = 64\n'
        f'[data]\ndataset = "{ds}"\ntokenizer = "{tok}"\nseq_len = 32\n'
        f"[train]\nbatch_size = 4\nmax_steps = 4\neval_interval = 0\nlog_interval = 1\n"
        f'tensorboard = false\nprogress = false\ndtype = "float32"\nthreads = 1\n'
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run), "--model.n_embd", "48"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["n_embd"] == 48 and saved["model"]["n_layer"] == 2
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 2  # would overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--train.max_steps", "6"]) == 0
    assert sorted(losses(run)) == list(range(1, 7))
    assert load_model(run).config.n_embd == 48
    assert main(["train", "--config", str(config), "--model.n_head", "5"]) == 2
    assert "n_head" in capsys.readouterr().err


def test_main_job_end_to_end_on_a_small_corpus(tmp_path: Path, capsys):
    """The no-argument pipeline (tokenizer -> data -> train -> sample), on a small corpus and model."""
    from gptlab.train.pipeline import main_job

    corpus = [STDLIB / n for n in CORPUS]
    over = [
        "--model.n_layer",
        "1",
        "--model.n_embd",
        "32",
        "--model.n_head",
        "2",
        "--model.n_ctx",
        "64",
        "--data.seq_len",
        "32",
        "--train.batch_size",
        "4",
        "--train.progress",
        "false",
        "--train.tensorboard",
        "false",
        "--train.eval_interval",
        "5",
        "--train.max_steps",
        "12",
        "--train.threads",
        "1",
    ]
    result = main_job(
        0.25,
        over,
        data_dir=tmp_path / "data",
        run_dir=tmp_path / "run",
        corpus=corpus,
        vocab_size=300,
        sample_tokens=8,
        progress=False,
    )
    out = capsys.readouterr().out
    assert result.step == 12 and result.loss < 5.7
    assert "sample" in out and "def " in out and f"gptlab generate {tmp_path / 'run'}" in out
    assert (tmp_path / "data/tokenizer").is_dir() and (tmp_path / "data/dataset/manifest.json").is_file()
    # A second run reuses the cached tokenizer and dataset.
    main_job(
        0.25,
        over,
        data_dir=tmp_path / "data",
        run_dir=tmp_path / "run2",
        corpus=corpus,
        vocab_size=300,
        sample_tokens=4,
        progress=False,
    )
    out = capsys.readouterr().out
    assert "tokenizer: reusing" in out and "data: reusing" in out


@pytest.mark.slow
def test_compile_matches_eager(dataset, tmp_path: Path):
    base = {"train.max_steps": 3, "train.eval_interval": 0}
    eager = losses(_train(tiny_config(dataset, tmp_path / "a", **base)).run_dir)
    compiled = losses(_train(tiny_config(dataset, tmp_path / "b", **base, **{"train.compile": True})).run_dir)
    assert max(abs(eager[s] - compiled[s]) for s in eager) < 1e-4


def test_dataclass_roundtrip():
    cfg = TrainConfig()
    assert TrainConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_example_training_configs_load():
    examples = Path(__file__).resolve().parents[1] / "examples"
    files = sorted(examples.glob("train-*.toml")) + sorted(examples.glob("train-*.yaml"))
    assert len(files) >= 3
    for file in files:
        cfg = load_train_config(file)
        assert cfg.model.resolve().n_layer >= 1, file


def test_tensorboard_scalars_read_back_in_full_precision(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    from gptlab.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, ["tensorboard"])
    rows = [{"step": 1, "loss": 3.25, "time": 1796499981.7708316}, {"step": 2, "loss": 3.0, "val_loss": 3.1}]
    for row in rows:
        logger.log(row)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    value = {
        tag: [(e.step, float(make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]
    }
    assert value["train/time"] == [(1, 1796499981.7708316)]  # float32 would give 1796499968.0
    assert value["train/loss"] == [(1, 3.25), (2, 3.0)] and value["val/loss"] == [(2, 3.1)]


def test_tensorboard_asked_for_but_missing_is_one_warning(tmp_path: Path, monkeypatch, capsys):
    import builtins

    from gptlab.train.metrics import MetricsLogger

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    logger = MetricsLogger(tmp_path, ["tensorboard"])
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorboard is not installed" in err[0] and "gptlab[tensorboard]" in err[0]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    MetricsLogger(tmp_path, []).close()
    assert capsys.readouterr().err == ""
