"""Deployment exports: GGUF (checked by llama.cpp itself) and ONNX (checked by onnxruntime).

References are independent of the exporters: gptlab's own forward pass with no cache (a plain argmax
loop), GPT-2's original encoder.json / vocab.bpe files, transformers for Hugging Face models.

Random weights at GPT-2's init (std 0.02) make a model that repeats one token forever, which would
not exercise positions or the KV cache. So the models here are "lively": weight matrices drawn with
std 0.3 and the final LayerNorm gain raised, which gives varied continuations and logits of +-50.
Greedy decoding can still meet near-ties, where implementations that differ by float rounding
legitimately pick different tokens (llama.cpp evaluates GELU through an fp16 table: its f32 logits
differ from torch's by ~5e-4 of their range). Every greedy comparison therefore walks llama.cpp's
path teacher-forced through gptlab: each token must be gptlab's argmax, except where gptlab's own
top-1 / top-2 margin is below the logit tolerance (counted; at most a few are allowed). ONNX runs in
fp32 (differences ~1e-6), so its greedy tokens must equal gptlab's exactly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.model import GPT

NEW_TOKENS = 32
ONNX_MIN_MARGIN = 1e-3  # onnxruntime fp32 differs from torch by ~1e-6
PROMPTS = [
    "Hello, my name is",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    'In 1997, naïve café owners said: "it\'s 42%!"',
]
TOKENIZER_TEXTS = PROMPTS + [
    "   leading and trailing spaces   ",
    "line one\n\nline two\r\n\ttabbed",
    "We'll see; they're here, I'd say it's done. DON'T SHOUT",
    "Unicode: 東京, Привет мир, 😀🚀, Straße",
    'numbers 3.14159 2718 1e-5 0x1F and <p class="x">html</p>',
    "<|endoftext|> is plain text here",
]


def lively(parameters, seed: int, std: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def seeded_gpt(config: ModelConfig, seed: int = 0, gain: float = 4.0) -> GPT:
    model = GPT(config)
    lively(model.parameters(), seed)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(gain)
    return model.eval()


@torch.no_grad()
def greedy_reference(model: GPT, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy continuation recomputing the whole sequence each step (no KV cache), and the smallest
    top-1 / top-2 logit margin met on the way."""
    ids, margin = list(prompt), float("inf")
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0][0, -1]
        top = logits.topk(2).values
        margin = min(margin, float(top[0] - top[1]))
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :], margin


def export_cli(*args: str) -> int:
    return main(["export", *map(str, args)])


# ---- ONNX ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, Path]:
    """A GPT-3 style model (dense + locally banded layers, untied head) exported by the CLI (dynamo)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'gptlab[export]'")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed: pip install 'gptlab[export]'")
    config = ModelConfig(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_ctx=64,
        vocab_size=97,
        attn_pattern="alternating",
        local_window=4,
        tie_embeddings=False,
    )
    model = seeded_gpt(config, seed=1)
    root = tmp_path_factory.mktemp("onnx")
    save_model(model, root / "ckpt")
    assert export_cli(root / "ckpt", "--format", "onnx", "--out", root / "onnx") == 0
    return model, root / "onnx"


def test_onnx_logits_match_gptlab_for_several_shapes(onnx_export):
    from gptlab.interop.onnx_runtime import run_logits

    model, out = onnx_export
    generator = torch.Generator().manual_seed(0)
    # T > local_window exercises the band; T = n_ctx the whole position table.
    for batch, length in [(1, 1), (2, 5), (3, 17), (1, 64)]:
        ids = torch.randint(0, 97, (batch, length), generator=generator)
        with torch.no_grad():
            expected = model(ids)[0].numpy()
        got = run_logits(out, ids.numpy())
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_onnx_with_past_greedy_decode_matches_gptlab(onnx_export):
    from gptlab.interop.onnx_runtime import OnnxDecoder

    model, out = onnx_export
    decoder = OnnxDecoder(out)
    # Equal lengths, then left padding (a 3-token prompt beside a 9-token one).
    for prompts in ([[5, 17, 3, 88, 41], [60, 2, 2, 9, 70]], [[11, 12, 13], [1, 30, 50, 70, 90, 3, 4, 5, 6]]):
        got = decoder.greedy(prompts, NEW_TOKENS)
        for prompt, ids in zip(prompts, got, strict=True):
            expected, margin = greedy_reference(model, prompt, NEW_TOKENS)
            assert margin > ONNX_MIN_MARGIN, "the reference itself has a near-tie: pick another seed"
            assert ids == expected
            assert len(set(expected)) > 3  # a non-degenerate continuation


def test_onnx_with_past_step_logits_match_no_cache(onnx_export):
    from gptlab.interop.onnx_runtime import OnnxDecoder

    model, out = onnx_export
    decoder = OnnxDecoder(out)
    ids = np.array([[4, 8, 15, 16, 23, 42]], dtype=np.int64)
    empty = [np.zeros((1, 2, 0, 16), dtype=np.float32) for _ in range(4)]
    _, past = decoder.step(ids[:, :4], np.ones((1, 4), dtype=np.int64), empty)  # prefill from P = 0
    logits, past = decoder.step(ids[:, 4:], np.ones((1, 6), dtype=np.int64), past)
    assert past[0].shape == (1, 2, 6, 16)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids))[0][:, 4:].numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_onnx_graphs_have_dynamic_axes_and_metadata(onnx_export):
    import onnx

    _, out = onnx_export
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    assert list(inputs) == [  # Optimum's names (ORTModelForCausalLM finds the cache by them)
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert [o.name for o in graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    ids_dims = inputs["input_ids"].type.tensor_type.shape.dim
    assert all(d.dim_param and not d.dim_value for d in ids_dims)  # batch and sequence are symbolic
    info = json.loads((out / "export.json").read_text())
    assert info["model"]["attn_pattern"] == "alternating" and info["exporter"] == "dynamo"
    config = json.loads((out / "config.json").read_text())  # what Optimum reads, and the real config
    assert config["model_type"] == "gpt2" and config["n_head"] == 2 and config["use_cache"] is True
    assert config["gptlab"]["attn_pattern"] == "alternating" and config["gptlab"]["local_window"] == 4


def test_onnx_torchscript_exporter_tied_dense_model(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'gptlab[export]'")
    from gptlab.interop.onnx import export_onnx
    from gptlab.interop.onnx_runtime import OnnxDecoder, run_logits

    model = seeded_gpt(ModelConfig(n_layer=2, n_head=4, n_embd=32, n_ctx=48, vocab_size=120), seed=2)
    export_onnx(model, tmp_path / "ts", exporter="torchscript")
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids)[0].numpy()
    np.testing.assert_allclose(run_logits(tmp_path / "ts", ids.numpy()), expected, atol=1e-4, rtol=0)
    prompt = [7, 3, 99, 14]
    reference, margin = greedy_reference(model, prompt, NEW_TOKENS)
    assert margin > ONNX_MIN_MARGIN
    assert OnnxDecoder(tmp_path / "ts").greedy([prompt], NEW_TOKENS)[0] == reference


@pytest.fixture(scope="module")
def onnx_with_tokenizer(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[GPT, Path, Path]:
    """A dense model on the 300-id tiny tokenizer: (model, checkpoint, ONNX dir exported by the CLI)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'gptlab[export]'")
    model = seeded_gpt(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=64, vocab_size=300), seed=4, gain=2.0)
    root = tmp_path_factory.mktemp("onnx-tok")
    save_model(model, root / "ckpt", tokenizer=tiny_tokenizer)
    assert export_cli(root / "ckpt", "--format", "onnx", "--out", root / "onnx", "--onnx-exporter", "torchscript") == 0
    return model, root / "ckpt", root / "onnx"


def test_onnx_seeded_sampling_matches_gptlab_generate(onnx_with_tokenizer):
    from gptlab.infer.generate import generate_ids
    from gptlab.infer.sampling import SamplingParams
    from gptlab.interop.onnx_runtime import OnnxDecoder

    model, _, out = onnx_with_tokenizer
    decoder = OnnxDecoder(out)
    prompts = [[5, 17, 3, 88], [60, 2, 9, 70, 1, 44, 250]]  # different lengths: left padding in onnxruntime
    settings = [
        dict(temperature=0.0),
        dict(temperature=0.9, top_k=40, seed=1),
        dict(temperature=1.3, top_p=0.9, seed=2, n=2),
        dict(temperature=0.8, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.5, seed=3),
    ]
    for setting in settings:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, **setting)
        got = decoder.generate_ids(prompts, params, eos_id=299)
        expected = generate_ids(model, prompts, params, eos_id=299)
        assert got == expected, setting
        assert all(len(set(ids)) > 3 for ids in expected)  # lively continuations, not one token repeated
    sampled = decoder.generate_ids(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=9))
    assert sampled != decoder.greedy(prompts, NEW_TOKENS)  # sampling really samples


def test_generate_cli_on_onnx_dir_matches_checkpoint(onnx_with_tokenizer, capsys):
    _, ckpt, out = onnx_with_tokenizer
    for flags in (["--temperature", "0"], ["--temperature", "0.9", "--top-p", "0.95", "--seed", "7"]):
        args = ["generate", None, "def add(", "--max-new-tokens", "24", *flags]
        assert main([str(ckpt) if a is None else a for a in args]) == 0
        expected = capsys.readouterr().out
        assert main([str(out) if a is None else a for a in args]) == 0
        assert capsys.readouterr().out == expected and len(expected.strip()) > 5
    assert main(["generate", str(out), "def", "--max-new-tokens", "4", "--n", "2", "--seed", "1"]) == 0
    assert capsys.readouterr().out.count("--- completion") == 2
    assert main(["generate", str(out), "def", "--beams", "2"]) == 2
    assert "--beams apply to checkpoints" in capsys.readouterr().err


def test_export_shows_its_stages(tmp_path, capsys, tiny_tokenizer):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'gptlab[export]'")
    model = seeded_gpt(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=16, vocab_size=300))
    save_model(model, tmp_path / "c", tokenizer=tiny_tokenizer)
    onnx_args = ("--format", "onnx", "--out", tmp_path / "o", "--onnx-exporter", "torchscript")
    assert export_cli(tmp_path / "c", *onnx_args) == 0
    err = capsys.readouterr().err.splitlines()
    starts = [line for line in err if line.endswith(" ...")]
    assert [line.split("]")[0] for line in starts] == ["export: [1/3", "export: [2/3", "export: [3/3"]
    assert "tracing the model into model.onnx" in starts[1]
    assert sum("] done in " in line for line in err) == 3 and err[-1].startswith("export: onnx export done in")
    if importlib.util.find_spec("gguf") is not None:
        assert export_cli(tmp_path / "c", "--format", "gguf", "--out", tmp_path / "m.gguf") == 0
        err = capsys.readouterr().err.splitlines()
        assert [line.split("]")[0] for line in err if line.endswith(" ...")] == ["export: [1/2", "export: [2/2"]
        assert err[-1].startswith("export: gguf export done in")


def test_export_cli_reports_bad_input(tmp_path, capsys):
    assert export_cli(tmp_path / "missing", "--format", "onnx", "--out", tmp_path / "o") == 2
    assert "missing does not exist" in capsys.readouterr().err
    save_model(seeded_gpt(ModelConfig(n_layer=1, n_head=1, n_embd=8, n_ctx=16, vocab_size=50)), tmp_path / "c")
    assert export_cli(tmp_path / "c", "--format", "onnx", "--out", tmp_path / "o", "--dtype", "q8_0") == 2
    assert "applies to GGUF only" in capsys.readouterr().err
    (tmp_path / "taken.gguf").write_bytes(b"x")
    assert export_cli(tmp_path / "c", "--format", "gguf", "--out", tmp_path / "taken.gguf") == 2
    assert "--overwrite" in capsys.readouterr().err
    # A checkpoint trained on raw ids has no vocabulary to put in the GGUF file.
    assert export_cli(tmp_path / "c", "--format", "gguf", "--out", tmp_path / "m.gguf") == 2
    assert "no tokenizer found" in capsys.readouterr().err


# ---- GGUF: file contents --------------------------------------------------------------------------
GPT2_SMALL = ModelConfig(n_layer=2, n_head=2, n_embd=64, n_ctx=128, vocab_size=50257)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer) -> tuple[GPT, Path, dict[str, Path]]:
    """A small model with GPT-2's real vocabulary, saved with its tokenizer, exported as f32 / f16 / q8_0."""
    pytest.importorskip("gguf", reason="gguf is not installed: pip install 'gptlab[export]'")
    model = seeded_gpt(GPT2_SMALL, seed=0)
    root = tmp_path_factory.mktemp("gguf")
    save_model(model, root / "ckpt", tokenizer=gpt2_tokenizer)
    files = {dtype: root / f"model-{dtype}.gguf" for dtype in ("f32", "f16", "q8_0")}
    for dtype, file in files.items():
        assert export_cli(root / "ckpt", "--format", "gguf", "--out", file, "--dtype", dtype) == 0
    return model, root / "ckpt", files


def _field(reader, key: str):
    field = reader.fields[key]
    return field.contents()


def test_gguf_metadata_tensors_and_vocabulary(gguf_files, gpt2_bpe_dir):
    import gguf

    model, _, files = gguf_files
    reader = gguf.GGUFReader(str(files["f32"]))
    expected_meta = {
        "general.architecture": "gpt2",
        "gpt2.context_length": 128,
        "gpt2.embedding_length": 64,
        "gpt2.feed_forward_length": 256,
        "gpt2.block_count": 2,
        "gpt2.attention.head_count": 2,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 50256,
        "tokenizer.ggml.eos_token_id": 50256,
    }
    assert {k: _field(reader, k) for k in expected_meta} == expected_meta
    assert _field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    # The vocabulary against GPT-2's original files, read directly.
    encoder = json.loads((gpt2_bpe_dir / "encoder.json").read_text(encoding="utf-8"))
    assert _field(reader, "tokenizer.ggml.tokens") == sorted(encoder, key=encoder.get)
    merges = (gpt2_bpe_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    assert _field(reader, "tokenizer.ggml.merges") == [m for m in merges if m]
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {gguf.TokenType.NORMAL}
    # Tensor names are those llama.cpp's gpt2 architecture declares (tied: no separate `output`).
    arch = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2]}
    blocks = [n for n in arch if n.startswith("blk.")]
    expected = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"}
    expected |= {n.format(bid=i) + s for n in blocks for i in range(2) for s in (".weight", ".bias")}
    assert arch == {"token_embd", "position_embd", "output_norm", "output", *blocks} and len(blocks) == 6
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected
    qkv = tensors["blk.1.attn_qkv.weight"]
    assert list(qkv.shape) == [64, 192]  # ggml order: (in, out)
    np.testing.assert_array_equal(
        np.asarray(qkv.data).reshape(192, 64), model.transformer.h[1].attn.c_attn.weight.detach().numpy()
    )


def test_gguf_quantized_tensors_dequantize_close(tmp_path, tiny_tokenizer):
    gguf = pytest.importorskip("gguf", reason="gguf is not installed: pip install 'gptlab[export]'")
    from gptlab.interop.gguf import write_gguf

    model = seeded_gpt(ModelConfig(n_layer=1, n_head=2, n_embd=64, n_ctx=32, vocab_size=300))
    wte = model.transformer.wte.weight.detach().numpy()
    for dtype, qtype, tol in (
        ("f16", gguf.GGMLQuantizationType.F16, 1e-3),
        ("q8_0", gguf.GGMLQuantizationType.Q8_0, 1e-2),
    ):
        reader = gguf.GGUFReader(str(write_gguf(model, tiny_tokenizer, tmp_path / f"{dtype}.gguf", dtype)))
        tensors = {t.name: t for t in reader.tensors}
        assert _field(reader, "general.file_type") == {"f16": 1, "q8_0": 7}[dtype]  # llama_ftype values
        assert tensors["blk.0.attn_norm.bias"].tensor_type == gguf.GGMLQuantizationType.F32  # vectors stay f32
        embd = tensors["token_embd.weight"]
        assert embd.tensor_type == qtype
        values = gguf.quants.dequantize(np.asarray(embd.data), qtype).reshape(wte.shape)
        assert np.abs(values - wte).max() < tol * np.abs(wte).max()


def test_gguf_refuses_alternating_attention(tmp_path, tiny_tokenizer):
    pytest.importorskip("gguf", reason="gguf is not installed: pip install 'gptlab[export]'")
    from gptlab.interop.gguf import write_gguf

    config = ModelConfig(
        n_layer=2, n_head=2, n_embd=32, n_ctx=64, vocab_size=300, attn_pattern="alternating", local_window=8
    )
    with pytest.raises(ValueError, match="alternating.*llama.cpp's gpt2"):
        write_gguf(seeded_gpt(config), tiny_tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_gguf_untied_head_padded_vocab_and_mismatch(tmp_path, tiny_tokenizer):
    gguf = pytest.importorskip("gguf", reason="gguf is not installed: pip install 'gptlab[export]'")
    from gptlab.interop.gguf import write_gguf

    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, n_ctx=32, vocab_size=320, tie_embeddings=False)
    model = seeded_gpt(config)
    reader = gguf.GGUFReader(str(write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf")))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 320 and tokens[300:302] == ["[PAD300]", "[PAD301]"]
    assert _field(reader, "tokenizer.ggml.token_type")[305] == gguf.TokenType.UNUSED
    head = {t.name: t for t in reader.tensors}["output.weight"]
    np.testing.assert_array_equal(np.asarray(head.data).reshape(320, 32), model.lm_head.weight.detach().numpy())
    small = seeded_gpt(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_ctx=32, vocab_size=290))
    with pytest.raises(ValueError, match="tokenizer has 300 tokens but the model embeds only 290"):
        write_gguf(small, tiny_tokenizer, tmp_path / "small.gguf")


# ---- GGUF: llama.cpp runs it ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_cpp():
    """llama-cpp-python, requested first by llama.cpp tests so they skip before exporting anything."""
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install 'gptlab[llama]'; it compiles llama.cpp)"
    )


@contextlib.contextmanager
def open_llama(llama_cpp, file: Path, n_ctx: int):
    # f32 KV cache: llama.cpp's default f16 cache would add its own rounding to the comparison.
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=str(file),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=1,
        logits_all=True,
        type_k=f32,
        type_v=f32,
        verbose=False,
    )
    try:
        yield llm
    finally:
        llm.close()


def llama_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation by llama.cpp (its own KV cache) and the logits of each step, (n, vocab)."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out, np.array(llm.scores[len(prompt) - 1 : len(prompt) - 1 + n], dtype=np.float32)


def check_path(logits_fn, prompt: list[int], got: list[int], logits: np.ndarray, rel_tol: float) -> int:
    """Compare llama.cpp's greedy path with the reference teacher-forced along it.

    Logits must agree within rel_tol of their range; every token must be the reference's argmax unless
    the reference's own margin there is below that tolerance (a near-tie). Returns the near-tie count.
    """
    with torch.no_grad():
        reference = logits_fn(torch.tensor([prompt + got[:-1]]))[len(prompt) - 1 :].numpy()
    tol = rel_tol * float(np.abs(reference).max())
    assert np.abs(logits - reference).max() < tol
    ties = 0
    for step, (token, row) in enumerate(zip(got, reference, strict=True)):
        best = int(row.argmax())
        if token != best:
            margin = float(row[best] - row[token])
            assert margin < tol, f"step {step}: llama.cpp chose {token}, gptlab {best} by a margin of {margin:.3f}"
            ties += 1
    return ties


def test_llamacpp_f32_matches_gptlab_tokens_and_greedy(llama_cpp, gguf_files, gpt2_tokenizer):
    model, _, files = gguf_files
    gptlab_logits = lambda ids: model(ids)[0][0]
    with open_llama(llama_cpp, files["f32"], n_ctx=128) as llm:
        for text in TOKENIZER_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == gpt2_tokenizer.encode(text), text
        ties = 0
        for text in PROMPTS:
            prompt = gpt2_tokenizer.encode(text)
            got, logits = llama_greedy(llm, prompt, NEW_TOKENS)
            # With no near-tie, every token is gptlab's argmax after the same prefix: the whole
            # continuation is gptlab's own greedy one.
            ties += check_path(gptlab_logits, prompt, got, logits, rel_tol=2e-3)
            assert len(set(got)) > 8  # a varied continuation: positions and the cache matter
        assert ties <= 2, f"{ties} near-ties in {len(PROMPTS) * NEW_TOKENS} steps: make the model more decisive"


def test_llamacpp_f16_and_q8_0_load_and_generate(llama_cpp, gguf_files, gpt2_tokenizer):
    model, _, files = gguf_files
    gptlab_logits = lambda ids: model(ids)[0][0]
    prompt = gpt2_tokenizer.encode(PROMPTS[1])
    with open_llama(llama_cpp, files["f16"], n_ctx=128) as llm:
        got, logits = llama_greedy(llm, prompt, NEW_TOKENS)
    assert check_path(gptlab_logits, prompt, got, logits, rel_tol=0.01) <= 2
    with open_llama(llama_cpp, files["q8_0"], n_ctx=128) as llm:
        got, logits = llama_greedy(llm, prompt, NEW_TOKENS)
    # 8-bit weights move these chaotic random models' logits by up to ~10% of their range: a loose
    # bound, and most greedy tokens still agree with gptlab teacher-forced on the same path.
    with torch.no_grad():
        reference = gptlab_logits(torch.tensor([prompt + got[:-1]]))[len(prompt) - 1 :].numpy()
    assert np.abs(logits - reference).max() < 0.2 * np.abs(reference).max()
    assert (reference.argmax(-1) == np.array(got)).mean() >= 0.75


def test_llamacpp_runs_an_imported_hugging_face_gpt2(llama_cpp, tmp_path, gpt2_tokenizer):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install 'gptlab[hf]'")
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=96, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    lively(hf.parameters(), seed=4)
    with torch.no_grad():
        hf.transformer.ln_f.weight.mul_(4.0)
    hf.save_pretrained(tmp_path / "hf")
    gpt2_tokenizer.save(tmp_path / "hf")  # vocab.json + merges.txt, as Hugging Face ships GPT-2
    assert export_cli(tmp_path / "hf", "--format", "gguf", "--out", tmp_path / "hf.gguf") == 0
    hf_logits = lambda ids: hf(ids).logits[0]  # the reference is transformers itself, no gptlab code
    with open_llama(llama_cpp, tmp_path / "hf.gguf", n_ctx=96) as llm:
        ties = 0
        for text in PROMPTS[:2]:
            prompt = gpt2_tokenizer.encode(text)
            got, logits = llama_greedy(llm, prompt, NEW_TOKENS)
            ties += check_path(hf_logits, prompt, got, logits, rel_tol=2e-3)
    assert ties <= 1


def test_llamacpp_runs_a_tiny_trained_bpe_model(llama_cpp, tmp_path, tiny_tokenizer, tiny_corpus):
    from gptlab.interop.gguf import write_gguf

    model = seeded_gpt(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=64, vocab_size=300), seed=5)
    with open_llama(llama_cpp, write_gguf(model, tiny_tokenizer, tmp_path / "tiny.gguf"), n_ctx=64) as llm:
        for text in tiny_corpus[:10] + TOKENIZER_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tiny_tokenizer.encode(text), text
        prompt = tiny_tokenizer.encode("The quick brown fox")
        got, logits = llama_greedy(llm, prompt, NEW_TOKENS)
    assert check_path(lambda ids: model(ids)[0][0], prompt, got, logits, rel_tol=2e-3) <= 1
