"""Shared fixtures: GPT-2's real BPE files and a tiny trained tokenizer (both session-scoped)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

GPT2_BPE_DIR = Path(__file__).resolve().parents[2] / "shared/fixtures/gpt2-bpe"

_TINY_SNIPPETS = [
    "The quick brown fox jumps over the lazy dog. ",
    "It's a truth universally acknowledged that we'll need more tokens. ",
    "def add(a, b):\n    return a + b\n\n",
    "for i in range(10):\n\tprint(i * 2)  # comment\n",
    "Numbers: 3.14159, 2718, 1e-5 and 42!\n",
    "Unicode: naïve café, Straße, 東京, Привет мир, 😀🚀 done.\n",
    "   leading spaces, trailing spaces   \n\n",
    '<p class="x">Hello, world</p>\n',
]


@pytest.fixture(scope="session")
def gpt2_bpe_dir() -> Path:
    """Directory with GPT-2's original encoder.json + vocab.bpe; skips the test when absent."""
    if not all((GPT2_BPE_DIR / f).is_file() for f in ("encoder.json", "vocab.bpe")):
        pytest.skip(f"GPT-2 BPE fixtures not found at {GPT2_BPE_DIR} (need encoder.json and vocab.bpe)")
    return GPT2_BPE_DIR


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_bpe_dir: Path):
    """GPT-2's tokenizer loaded from the fixture files (about a second; shared by the session)."""
    from gptlab.tokenizer import Tokenizer

    return Tokenizer.gpt2(gpt2_bpe_dir)


@pytest.fixture(scope="session")
def tiny_corpus() -> list[str]:
    """About 8 KB of deterministic mixed text (prose, code, numbers, Unicode) in 40 documents."""
    rng = random.Random(0)
    return ["".join(rng.choice(_TINY_SNIPPETS) for _ in range(5)) for _ in range(40)]


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus: list[str]):
    """A 300-id byte-level BPE (256 bytes + 43 merges + <|endoftext|> = id 299) trained on tiny_corpus."""
    from gptlab.tokenizer import Tokenizer

    return Tokenizer.train(tiny_corpus, vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models
    decode faster and deterministically so; the caller's count comes back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lm_eval_env(tmp_path_factory: pytest.TempPathFactory):
    """lm-eval imported with the Hugging Face hub offline and a private datasets cache; the `gptlab`
    model type registered."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("hf-cache")
    env = {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cache),
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    for var, value in env.items():
        mp.setenv(var, value)
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'gptlab[eval]')")
    import gptlab.eval.lm_eval_adapter  # noqa: F401  (registers the "gptlab" model)

    yield lm_eval
    mp.undo()


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE whose only merge never occurs in the tests' data: one token per character."""
    from gptlab.tokenizer import Tokenizer

    return Tokenizer.train(["qzqzqz "] * 20, vocab_size=258, show_progress=False)
