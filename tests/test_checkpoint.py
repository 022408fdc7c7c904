"""Checkpoint integrity: checksums recorded and verified, non-finite weights rejected, corrupt configs
named, resume falling back past a corrupt newest checkpoint (or picking a step), interrupted writes
cleaned up, files with the umask's permissions."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import CHECKSUMS_FILE, load_model, load_tokenizer, save_model
from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.model import GPT
from gptlab.train.state import clean_interrupted_writes, read_checkpoint
from tests.test_train import _train, losses, make_dataset, tiny_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def checkpoint(tmp_path: Path, tiny_tokenizer) -> Path:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=32, vocab_size=tiny_tokenizer.vocab_size))
    return save_model(model, tmp_path / "ckpt", tiny_tokenizer)


def flip_bytes(file: Path, count: int = 16, at: float = 0.5) -> None:
    """XOR `count` bytes in the middle of the file: for safetensors, inside the tensor data."""
    data = bytearray(file.read_bytes())
    start = int(len(data) * at)
    for i in range(start, start + count):
        data[i] ^= 0x5A
    file.write_bytes(bytes(data))


# ---- checksums ----------------------------------------------------------------------------------
def test_every_file_is_recorded_and_a_flipped_byte_is_named(checkpoint: Path, capsys):
    recorded = json.loads((checkpoint / CHECKSUMS_FILE).read_text())
    assert recorded["algorithm"] == "sha256"
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(recorded["files"]) == on_disk - {CHECKSUMS_FILE}
    assert {"config.json", "model.safetensors", "tokenizer/vocab.json"} <= set(recorded["files"])
    before = {k: v.clone() for k, v in load_model(checkpoint).state_dict().items()}

    weights = checkpoint / "model.safetensors"
    flip_bytes(weights)
    with pytest.raises(ValueError, match="SHA-256") as err:
        load_model(checkpoint)
    assert str(weights) in str(err.value)
    assert main(["generate", str(checkpoint), "hi", "--max-new-tokens", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(weights) in error

    # A checkpoint from before checksums existed loads unverified: the same flip goes unnoticed.
    (checkpoint / CHECKSUMS_FILE).unlink()
    after = load_model(checkpoint).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_flipped_tokenizer_byte_is_named(checkpoint: Path):
    vocab = checkpoint / "tokenizer/vocab.json"
    text = vocab.read_text()
    vocab.write_text(text.replace('"', "'", 1))
    with pytest.raises(ValueError, match="SHA-256") as err:
        load_tokenizer(checkpoint)
    assert str(vocab) in str(err.value)


def test_a_missing_listed_file_is_named(checkpoint: Path):
    (checkpoint / "tokenizer/merges.txt").unlink()
    with pytest.raises(ValueError, match="merges.txt is missing"):
        load_tokenizer(checkpoint)


# ---- non-finite weights and corrupt configs -----------------------------------------------------
def test_nonfinite_weights_are_rejected_with_the_tensor_name(tmp_path: Path, tiny_tokenizer, capsys):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=32, vocab_size=tiny_tokenizer.vocab_size))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 5] = float("nan")
    directory = save_model(model, tmp_path / "nan", tiny_tokenizer)  # checksums match: NaN was saved
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight holds 1 non-finite"):
        load_model(directory)
    assert main(["generate", str(directory), "hi", "--max-new-tokens", "2"]) == 2
    assert "transformer.h.0.mlp.c_fc.weight" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[]", "must hold a JSON object, got a list"),
        (b'{"format": "gptlab"}', 'has no "model" object'),
        (b'{"format": "gptlab", "model": {"n_layer": "many"}}', '"model" is not a valid model config'),
        (bytes(range(128, 256)), "is not valid JSON"),
    ],
)
def test_corrupt_config_json_is_named(checkpoint: Path, content: bytes, message: str):
    config = checkpoint / "config.json"
    config.write_bytes(content)
    with pytest.raises(ValueError, match="SHA-256") as err:
        load_model(checkpoint)
    assert str(config) in str(err.value)
    (checkpoint / CHECKSUMS_FILE).unlink()  # what is left to say without checksums
    with pytest.raises(ValueError, match=message) as err:
        load_model(checkpoint)
    assert str(config) in str(err.value)


def test_files_get_the_umasks_permissions(checkpoint: Path, dataset, tmp_path: Path):
    old = os.umask(0o022)
    try:
        run = _train(tiny_config(dataset, tmp_path / "run", **{"train.max_steps": 2})).run_dir
        written = save_model(load_model(checkpoint), tmp_path / "saved")
    finally:
        os.umask(old)
    for root in (written, run / "checkpoints/step_00000002"):
        for p in [root, *root.rglob("*")]:
            assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


# ---- resume -------------------------------------------------------------------------------------
@pytest.fixture
def run(dataset, tmp_path: Path) -> Path:
    """A finished 6-step run with resumable checkpoints at steps 2, 4 and 6."""
    over = {"train.max_steps": 6, "train.checkpoint_interval": 2, "train.keep_checkpoints": 0, "train.eval_interval": 0}
    return _train(tiny_config(dataset, tmp_path / "run", **over)).run_dir


def _continue(dataset, run: Path, steps: int, resume=True):
    over = {"train.max_steps": steps, "train.checkpoint_interval": 2, "train.keep_checkpoints": 0}
    return _train(tiny_config(dataset, run, **{**over, "train.eval_interval": 0}), resume=resume)


def test_flipped_optimizer_bytes_are_named(run: Path):
    step = run / "checkpoints/step_00000006"
    flip_bytes(step / "train_state.safetensors", at=0.7)
    with pytest.raises(ValueError, match="SHA-256") as err:
        read_checkpoint(step)
    assert str(step / "train_state.safetensors") in str(err.value)


@pytest.mark.parametrize("damage", ["optimizer bytes", "train_state.json list", "weights bytes"])
def test_resume_skips_a_corrupt_newest_checkpoint(dataset, run: Path, damage: str, capsys):
    step6 = run / "checkpoints/step_00000006"
    if damage == "optimizer bytes":
        flip_bytes(step6 / "train_state.safetensors", at=0.7)
    elif damage == "weights bytes":
        flip_bytes(step6 / "model.safetensors")
    else:
        (step6 / "train_state.json").write_text("[1, 2]")
        (step6 / CHECKSUMS_FILE).unlink()  # so the JSON check itself speaks
    leftover = run / "checkpoints/.tmp-step_00000008-killed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    with pytest.warns(UserWarning, match=f"skipping checkpoint {step6}") as caught:
        result = _continue(dataset, run, 8)
    assert "step_00000006" in str(caught[0].message)
    assert result.step == 8 and not leftover.exists()
    out = capsys.readouterr().out
    assert f"removed {leftover}" in out
    assert f"resuming from {run / 'checkpoints/step_00000004'} (step 4" in out
    assert sorted(losses(run)) == list(range(1, 9))
    assert read_checkpoint(step6).state.step == 6  # step 6 trained again and rewritten intact


def test_resume_with_every_checkpoint_corrupt_is_an_error(dataset, run: Path):
    for step in (2, 4, 6):
        flip_bytes(run / f"checkpoints/step_{step:08d}/train_state.safetensors", at=0.7)
    with pytest.warns(UserWarning, match="skipping checkpoint"), pytest.raises(ValueError, match="none of the 3"):
        _continue(dataset, run, 8)


def test_resume_from_a_chosen_step_or_checkpoint_directory(run: Path, capsys):
    assert main(["train", "--resume", str(run), "--step", "2", "--train.max_steps", "4"]) == 0
    assert f"resuming from {run / 'checkpoints/step_00000002'} (step 2" in capsys.readouterr().out
    assert sorted(losses(run)) == [1, 2, 3, 4]
    step4 = run / "checkpoints/step_00000004"
    assert main(["train", "--resume", str(step4), "--train.max_steps", "5"]) == 0
    assert f"resuming from {step4} (step 4" in capsys.readouterr().out
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]
    assert main(["train", "--resume", str(run), "--step", "3"]) == 2
    assert "no resumable checkpoint at step 3; its checkpoints: steps [2, 4, 5, 6]" in capsys.readouterr().err


def test_interrupted_writes_are_cleaned_up(tmp_path: Path):
    root = tmp_path / "checkpoints"
    for name in ("step_00000002", ".tmp-step_00000004-x1", ".old-step_00000002-77", ".old-step_00000006-78"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(name)
    removed = clean_interrupted_writes(tmp_path)
    assert sorted(p.name for p in removed) == [".old-step_00000002-77", ".tmp-step_00000004-x1"]
    # A checkpoint moved aside whose replacement never landed is moved back.
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000006"]
    assert (root / "step_00000006/config.json").read_text() == ".old-step_00000006-78"
