"""Bad invocations: each gets one actionable line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import CHECKSUMS_FILE, save_model
from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.model import GPT


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_tokenizer) -> Path:
    """A working directory holding a good checkpoint, broken ones and broken config files."""
    monkeypatch.chdir(tmp_path)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=32, vocab_size=tiny_tokenizer.vocab_size))
    save_model(model, tmp_path / "ckpt", tiny_tokenizer)
    for name, config in [("nomodel", b'{"format": "gptlab"}'), ("listcfg", b"[]"), ("bincfg", bytes(range(256)))]:
        broken = save_model(model, tmp_path / name)
        (broken / "config.json").write_bytes(config)
        (broken / CHECKSUMS_FILE).unlink()  # as a checkpoint from before checksums: the content check speaks
    (tmp_path / "runs").mkdir()
    (tmp_path / "badrun").mkdir()
    (tmp_path / "badrun/config.json").write_text("[]")
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bin.json").write_bytes(bytes(range(128, 256)))
    (tmp_path / "evil.yaml").write_text('model: !!python/object/apply:os.system ["echo owned"]\n')
    (tmp_path / "good.toml").write_text("[train]\nmax_steps = 1\n")
    # Nothing here may start a server or reach the Hugging Face Hub.
    monkeypatch.setattr("gptlab.serve.app.serve", _must_not_run)
    monkeypatch.setattr("gptlab.interop.hf.download", _must_not_run)
    return tmp_path


def _must_not_run(*args, **kwargs):
    raise AssertionError("a bad invocation got past validation")


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")

BAD_INVOCATIONS = [
    pytest.param(["generate", "ckpt", "hi", "--device", "cuda"], "'cuda'", marks=no_cuda, id="no-cuda"),
    pytest.param(["generate", "ckpt", "hi", "--device", "cuda:99"], "'cuda:99'", id="cuda-index"),
    pytest.param(["generate", "ckpt", "hi", "--device", "bogus"], "'bogus' is not a torch device", id="bogus"),
    pytest.param(["eval", "perplexity", "ckpt", "--data", "afile", "--device", "gpu"], "'gpu'", id="eval-device"),
    pytest.param(["serve", "ckpt", "--port", "70000"], "0-65535", id="port-high"),
    pytest.param(["serve", "ckpt", "--port", "-1"], "0-65535", id="port-negative"),
    pytest.param(["serve", "ckpt", "--max-body-bytes", "-1"], "--max-body-bytes: must be at least 1", id="body"),
    pytest.param(["serve", "ckpt", "--max-n", "0"], "--max-n: must be at least 1", id="max-n"),
    pytest.param(["train", "--config", "evil.yaml"], "evil.yaml", id="yaml-python-tag"),
    pytest.param(["train", "--config", "list.json"], "list.json must hold a table", id="json-list"),
    pytest.param(["train", "--config", "bin.json"], "bin.json is not UTF-8", id="binary-config"),
    pytest.param(["train", "--resume", "badrun"], "badrun/config.json must hold a table", id="run-config-list"),
    pytest.param(["train", "--config", "good.toml", "--run-dir", "afile"], "afile is a file", id="run-dir-file"),
    pytest.param(["train", "--time-limit", "-1"], "--time-limit: must be a positive number", id="time-limit"),
    pytest.param(["train", "--config", "good.toml", "--step", "2"], "--step N picks", id="step-alone"),
    pytest.param(["generate", "nomodel", "hi"], 'nomodel/config.json has no "model"', id="no-model"),
    pytest.param(["generate", "listcfg", "hi"], "listcfg/config.json must hold a JSON object", id="config-list"),
    pytest.param(["generate", "bincfg", "hi"], "bincfg/config.json is not valid JSON", id="config-binary"),
    pytest.param(["generate", "runs/nano-typo", "hi"], "runs/nano-typo does not exist", id="typo-path"),
    pytest.param(["generate", "nano-typo", "hi"], "nano-typo does not exist", id="bare-name"),
    pytest.param(["generate", "ckpt", "hi", "--repetition-penalty", "1e-300"], "repetition_penalty", id="penalty"),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_INVOCATIONS)
def test_bad_invocation_prints_one_line_and_fails(workdir: Path, capsys, argv: list[str], expected: str):
    try:
        code = main(argv)  # a traceback would be an exception escaping here, failing the test
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code not in (0, None)
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"gptlab {argv[0]}") and ": error: " in last and expected in last
    if "usage:" not in err:  # runtime errors: that one line and nothing else
        assert err == last


@pytest.mark.parametrize("temperature", ["1e-300", "5e-324", "1e-40"])
def test_tiny_temperatures_decode_greedily(workdir: Path, capsys, temperature: str):
    args = ["generate", "ckpt", "hi", "--max-new-tokens", "6", "--seed", "1"]
    assert main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--temperature", temperature]) == 0
    assert capsys.readouterr().out == greedy


def test_prepare_a_megabyte_of_spaces(tmp_path: Path, tiny_tokenizer, capsys):
    tiny_tokenizer.save(tmp_path / "tok")
    (tmp_path / "spaces.txt").write_text(" " * 1_000_000 + "x\n" + "\n" * 1_000_000)
    argv = ["prepare", str(tmp_path / "spaces.txt"), "--tokenizer", str(tmp_path / "tok")]
    assert main([*argv, "--out", str(tmp_path / "ds"), "--val-fraction", "0", "--no-progress"]) == 0
    assert "tokens" in capsys.readouterr().out
