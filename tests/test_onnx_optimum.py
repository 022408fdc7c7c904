"""`gptlab export --format onnx` as Hugging Face Optimum loads it: `ORTModelForCausalLM.from_pretrained(DIR)`
generates (greedy, left-padded batches, with its KV cache) the same tokens as gptlab and transformers.

Optimum's ONNX Runtime classes (optimum-onnx 0.1, the current release) need transformers < 4.58, older
than the `hf` extra's 5.x; `.ci/run` runs this file in a virtual environment over the main one with the
`optimum` extra installed. Where Optimum is not importable the tests skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import save_model
from gptlab.config import ModelConfig
from gptlab.model import GPT
from tests.test_export import export_cli, seeded_gpt

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def optimum_ort():
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError as e:
        pytest.skip(f"Optimum's onnxruntime classes are not importable ({e}): pip install 'gptlab[optimum]'")
    return ORTModelForCausalLM


def export(tmp_path: Path, model: GPT, tokenizer) -> Path:
    save_model(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert export_cli(tmp_path / "ckpt", "--format", "onnx", "--out", tmp_path / "onnx") == 0  # dynamo
    return tmp_path / "onnx"


def gptlab_greedy(model: GPT, prompts: list[list[int]], eos: int) -> list[list[int]]:
    from gptlab.infer.generate import generate_ids

    return generate_ids(model, prompts, eos_id=eos, max_new_tokens=NEW_TOKENS, temperature=0.0)


def optimum_greedy(ort_model, tokenizer, texts: list[str]) -> list[list[int]]:
    """Optimum's generate on a left-padded batch; new ids per text, stopping at (and dropping) eos."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    out = ort_model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    return [ids[: ids.index(eos)] if eos in ids else ids for ids in new]


def test_optimum_generates_what_gptlab_and_transformers_generate(tmp_path, tiny_tokenizer, optimum_ort):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from gptlab.interop.hf import save_hf

    model = seeded_gpt(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=64, vocab_size=300), seed=4, gain=2.0)
    out = export(tmp_path, model, tiny_tokenizer)
    ort_model = optimum_ort.from_pretrained(out)
    assert ort_model.can_use_cache and "position_ids" in ort_model.input_names
    hf_tokenizer = AutoTokenizer.from_pretrained(out)  # the export's tokenizer.json, left padding
    texts = ["def add(a, b):", "The quick brown fox jumps over the lazy", "It"]
    prompts = [tiny_tokenizer.encode(t) for t in texts]
    assert hf_tokenizer(texts)["input_ids"] == prompts
    eos = tiny_tokenizer.eot_id

    expected = gptlab_greedy(model, prompts, eos)
    assert all(len(ids) >= 8 and len(set(ids)) > 3 for ids in expected)  # lively, not one token repeated
    assert optimum_greedy(ort_model, hf_tokenizer, texts) == expected  # one left-padded batch
    assert [optimum_greedy(ort_model, hf_tokenizer, [t])[0] for t in texts] == expected

    save_hf(model, tmp_path / "hf", tiny_tokenizer)
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert optimum_greedy(hf_model, hf_tokenizer, texts) == expected

    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        logits = ort_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(logits, model(ids)[0], atol=1e-4, rtol=0)


def test_optimum_runs_gpt3_banded_attention(tmp_path, tiny_tokenizer, optimum_ort):
    """GPT-3's alternating dense / banded layers live in the graph, so Optimum runs them too (transformers'
    GPT-2 cannot)."""
    from transformers import AutoTokenizer

    config = ModelConfig(
        n_layer=2, n_head=2, n_embd=32, n_ctx=64, vocab_size=300, attn_pattern="alternating", local_window=4
    )
    model = seeded_gpt(config, seed=5, gain=2.0)
    out = export(tmp_path, model, tiny_tokenizer)
    texts = ["for i in range(10):", "Numbers: 3.14159, 2718"]
    expected = gptlab_greedy(model, [tiny_tokenizer.encode(t) for t in texts], tiny_tokenizer.eot_id)
    assert all(len(ids) >= 8 for ids in expected)  # past the band of 4
    got = optimum_greedy(optimum_ort.from_pretrained(out), AutoTokenizer.from_pretrained(out), texts)
    assert got == expected
